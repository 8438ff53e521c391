"""Windows (origin + shape along spatial axes): validation and the overlap tests every module shares."""

from __future__ import annotations

from typing import Sequence

from bioadapt.errors import BioadaptError


def as_int_tuple(values: Sequence[int], what: str) -> tuple[int, ...]:
    """Whole numbers as a tuple of ints, or an error naming ``what``."""
    try:
        out = tuple(int(v) for v in values)
    except (TypeError, ValueError) as err:
        raise BioadaptError(f"{what} must be a sequence of integers, got {values!r}") from err
    if any(float(v) != o for v, o in zip(values, out)):
        raise BioadaptError(f"{what} must be whole numbers, got {values!r}")
    return out


def check_window(origin: Sequence[int], shape: Sequence[int], bounds: Sequence[int], *, axes: str,
                 where: str) -> tuple[slice, ...]:
    """Check that the window lies inside ``bounds`` (the spatial shape of ``where``); return its slices."""
    origin_t = as_int_tuple(origin, "origin")
    shape_t = as_int_tuple(shape, "shape")
    if len(origin_t) != len(bounds) or len(shape_t) != len(bounds):
        raise BioadaptError(f"origin {origin_t} and shape {shape_t} must have {len(bounds)} values, one per "
                            f"spatial axis '{axes}' of {where}")
    if any(s <= 0 for s in shape_t):
        raise BioadaptError(f"window shape {shape_t} must be positive along every axis")
    if any(o < 0 for o in origin_t) or any(o + s > b for o, s, b in zip(origin_t, shape_t, bounds)):
        raise BioadaptError(f"window origin={origin_t} shape={shape_t} lies outside {where}, whose {axes} shape is "
                            f"{tuple(bounds)}; move the window inside")
    return tuple(slice(o, o + s) for o, s in zip(origin_t, shape_t))


def windows_overlap(a_origin: Sequence[int], a_shape: Sequence[int],
                    b_origin: Sequence[int], b_shape: Sequence[int]) -> bool:
    return all(a < b + bs and b < a + as_ for a, as_, b, bs in zip(a_origin, a_shape, b_origin, b_shape))


def window_contains(outer_origin: Sequence[int], outer_shape: Sequence[int],
                    inner_origin: Sequence[int], inner_shape: Sequence[int]) -> bool:
    return all(o <= i and i + s <= o + t for o, t, i, s in zip(outer_origin, outer_shape, inner_origin, inner_shape))
