#!/usr/bin/env bash
# Runs every command of README.md, as written, on tiny data (small overrides only where a
# command would otherwise train for minutes). Run from a clone after `make venv`:
#     .ci/readme_commands.sh            (uses .venv; WORK=<folder> keeps the outputs there)
# The commands run in a scratch folder laid out like the repository root (configs/ and models/
# linked), so the clone stays clean. Each command is echoed; the first failure stops the script.
# Last full pass: 2026-12-02 16:57-17:30 UTC, a fresh clone of main at 58fcba5
# (git clone /work/main /tmp/rc11; VENV=/work/main/.venv .ci/readme_commands.sh), the project's
# 2-core shared CPU machine beside the CI suite and a study, wall 1989 s, exit 0 (alone:
# 2026-12-02 00:28-00:42 UTC at e94b90f, 793 s). With VENV pointing at another checkout's editable install the
# shipped models/ are read from that checkout (cxr_io.resources); PYTHONPATH gives this clone's code.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${VENV:-$REPO/.venv}"
export PATH="$VENV/bin:$PATH" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# this checkout's code, also when the venv holds an install of another one
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true
WORK="${WORK:-$(mktemp -d)}"
mkdir -p "$WORK" && cd "$WORK"
ln -sfn "$REPO/configs" configs
ln -sfn "$REPO/models" models
echo "work folder: $WORK"
run() { echo "+ $*"; "$@"; }

TINY_STUDY=(--set 'study_def#synthetic#n_per_site=18' --set 'study_def#synthetic#size=64'
            --set 'study_def#synthetic#bias_test_n=6' --set 'study_def#train#epochs=1'
            --set 'study_def#train#size=32' --set 'study_def#train#tune_epochs=1'
            --set 'study_def#n_boot=20' --set 'study_def#heatmap_examples=2')

# --- Using it: from the shell
run isnet-cxr data synth --out data/synthetic --n-per-site 24 --size 64 --workers 1  # 24: test rows in every class
run isnet-cxr data check data/synthetic/manifest.csv --labels covid,normal,pneumonia
one_dcm="$(find data/synthetic/images -name '*.dcm' | sort | head -1)"
cp "$one_dcm" some.dcm
run isnet-cxr data show some.dcm --out preview.png
mkdir -p /tmp/isnet-readme-dicoms && rm -rf /tmp/isnet-readme-dicoms/* && cp data/synthetic/images/hospital-c/*.dcm /tmp/isnet-readme-dicoms/
run isnet-cxr seg predict /tmp/isnet-readme-dicoms --format png --format dicom_seg --out seg/
run isnet-cxr seg masks data/synthetic/manifest.csv --out with_masks/
run isnet-cxr train --manifest with_masks/manifest.csv --method isnet --out runs/isnet --size 32 --epochs 1 --tune-epochs 1
run isnet-cxr batch run /tmp/isnet-readme-dicoms --model runs/isnet/best_model.pt --out results/
run isnet-cxr study run configs/study.json --set 'study_def#seeds=[0,1]' --out outputs/study_seeds "${TINY_STUDY[@]}"
run isnet-cxr study run configs/study.json --overlay configs/study_isnet_recipe.json --out outputs/study_recipe "${TINY_STUDY[@]}" --set 'study_def#seeds=[0]'

# --- Using it: from Python
run python - <<'PY'
from pipeline import Predictor
p = Predictor.load("runs/isnet")
result = p("some.dcm")
print(result.probs, result.label, result.mask.shape, result.heatmap.shape, result.flags)
PY

# --- MONAI bundle (README order)
run python -m monai.bundle run --config_file configs/inference.json
run python -m monai.bundle run --config_file configs/inference.json --dataset_dir /tmp/isnet-readme-dicoms --ckpt_path runs/isnet/best_model.pt
run python -m monai.bundle run --config_file configs/train.json --dataset_dir data/synthetic --method isnet --tracking mlflow --epochs 1 --size 32 --tune_epochs 1
run python -m monai.bundle run --config_file "['configs/train.json','configs/evaluate.json']" --dataset_dir data/synthetic --method isnet --size 32
run python -m monai.bundle run --config_file configs/train_seg.json --meta_file configs/metadata_seg.json --dataset_dir data/synthetic --tracking mlflow --epochs 1 --spatial_size "[64,64]"
run python -m monai.bundle run --config_file configs/infer_seg.json --meta_file configs/metadata_seg.json --dataset_dir /tmp/isnet-readme-dicoms
run python -m monai.bundle run --config_file configs/study.json --output_dir outputs/study_bundle \
    --study_def#synthetic#n_per_site 18 --study_def#synthetic#size 64 --study_def#synthetic#bias_test_n 6 \
    --study_def#train#epochs 1 --study_def#train#size 32 --study_def#train#tune_epochs 1 --study_def#n_boot 20
run python -m monai.bundle verify_net_in_out network --meta_file configs/metadata.json --config_file configs/inference.json
run python -m monai.bundle verify_net_in_out network --meta_file configs/metadata_seg.json --config_file configs/infer_seg.json
run python -m monai.bundle verify_metadata --meta_file configs/metadata.json --filepath configs/metadata_schema.json
run python -m monai.bundle verify_metadata --meta_file configs/metadata_seg.json --filepath configs/metadata_schema.json

# --- Several GPUs or machines (2 CPU processes, gloo)
run torchrun --nproc_per_node=2 -m monai.bundle run \
    --config_file "['configs/train.json','configs/multi_gpu_train.json']" --dataset_dir data/synthetic --method isnet \
    --epochs 1 --size 32 --tune_epochs 1 --output_dir outputs/ddp

# --- A shared MLflow server (as in the README, on a free local port; this machine's name allowed)
port="$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
mkdir -p mlflow-server
echo "+ mlflow server ... --host 0.0.0.0 --port $port --allowed-hosts ..."
mlflow server --backend-store-uri "sqlite:///$PWD/mlflow-server/mlruns.db" --artifacts-destination "$PWD/mlflow-server/artifacts" \
    --host 0.0.0.0 --port "$port" --allowed-hosts "$(hostname),$(hostname):$port,localhost:$port,127.0.0.1:$port" \
    --workers 1 > mlflow-server/server.log 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do curl -sf "http://127.0.0.1:$port/health" > /dev/null && break; sleep 1; done
MLFLOW_TRACKING_URI="http://127.0.0.1:$port" run isnet-cxr study run configs/study.json --out outputs/study_server "${TINY_STUDY[@]}"
kill "$server"; wait "$server" 2>/dev/null || true
trap - EXIT
echo "every README command ran (outputs in $WORK)"
