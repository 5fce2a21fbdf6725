"""Property test: a mutated valid DICOM (flipped bytes, a cut tail, changed header values)
either reads into a finite float32 image in [0, 1] of the original size, or raises a
:class:`~cxr_io.readers.CXRReadError` subclass, never another exception, within a deadline.

The mutations live in :mod:`tests.dicom_mutations` (also used by the reliability counts)."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cxr_io.readers import CXRReadError, UnexpectedReadError, load_cxr
from tests.dicom_factory import ramp
from tests.dicom_mutations import BASE_KINDS, TAG_VALUES, base_dicom, mutate

SIZE = (32, 48)
_BASE: dict[str, bytes] = {}


def base_file(kind: str) -> bytes:
    """The base file of ``kind`` (see :func:`tests.dicom_mutations.base_dicom`) of a
    ``SIZE`` ramp, made once."""
    if kind not in _BASE:
        _BASE[kind] = base_dicom(kind, ramp(*SIZE, 4095))
    return _BASE[kind]


def _values(spec) -> st.SearchStrategy:
    return st.integers(*spec) if isinstance(spec, tuple) else st.sampled_from(spec)


mutation = st.one_of(
    st.tuples(st.just("flip"), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)))),
    st.tuples(st.just("cut"), st.integers(0, 10**6)),
    st.tuples(
        st.just("tag"),
        st.lists(
            st.sampled_from(sorted(TAG_VALUES)).flatmap(
                lambda k: st.tuples(st.just(k), _values(TAG_VALUES[k]))
            ),
            min_size=1,
            max_size=3,
        ),
    ),
)


@settings(
    max_examples=80,
    deadline=timedelta(seconds=5),
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,
)
@given(kind=st.sampled_from(BASE_KINDS), change=mutation)
def test_mutated_dicom_reads_or_raises_a_read_error(tmp_path, kind, change) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = mutate(base_file(kind), change)
    path = tmp_path / "m.dcm"
    path.write_bytes(data)
    try:
        image = load_cxr(path)
    except UnexpectedReadError as exc:  # a read error, but one without a diagnosis
        raise AssertionError(f"undiagnosed: {exc.reason}") from exc
    except CXRReadError:
        return
    px = image.pixels
    assert px.dtype == np.float32 and np.isfinite(px).all()
    assert px.min() >= 0.0 and px.max() <= 1.0
    if change[0] != "tag" or not {"Rows", "Columns"} & {k for k, _ in change[1]}:
        assert px.shape == SIZE, (px.shape, change)
