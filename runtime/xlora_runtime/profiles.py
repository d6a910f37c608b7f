"""Optimization profiles for TensorRT, derived from a graph's metadata record and the user's limits.

One spec (`ProfileLimits`) gives every profile; each profile is a (min, opt, max) triple per SYMBOLIC
dimension, and every input's shape is its contract dims with those values substituted. So the two caches and
the attention mask cannot disagree: `total_sequence = past_sequence + sequence` holds at min, opt and max of
every profile by construction (`check_profile` proves it for the built profiles).

    profile   batch           sequence        past_sequence          total_sequence
    prefill   1..opt_b..B     1..opt_s..S     0..0..0                1..opt_s..S
    decode    1..opt_b..B     1..1..1         1..opt_t-1..T-1        2..opt_t..T

B = max_batch, S = max_sequence (longest prompt), T = max_total (prompt + new tokens: positions a cache holds).
The runtime's calls are exactly these two kinds: a prefill has no past, a decode step one new token per row.
A TensorRT engine gets both profiles (tactics tuned at each opt point; `select_profile` picks per step).
ONNX Runtime's TensorRT execution provider runs every shape through one profile (`wide_profile`, opt at decode's
point). One profile covering both kinds of call must stay consistent at its max corner too (TensorRT sizes the
network at min, opt and max), so its mask reaches T + S - 1 positions: a prompt of S tokens after T - 1 cached
ones, which no call makes, and activation memory sized for it.

    wide      1..opt_b..B     1..1..S         0..opt_t-1..T-1        1..opt_t..T+S-1
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .errors import XLoraError
from .format import contract as C
from .format.record import GraphInfo
from .format.sidecar import Shapes

__all__ = ["DEFAULT_MAX_SEQUENCE", "DEFAULT_MAX_TOTAL", "PHASES", "ProfileLimits", "check_profile",
           "engine_profiles", "input_dims", "limits_for", "ort_tensorrt_options", "profile_shapes", "select_profile",
           "wide_profile"]

PHASES = ("prefill", "decode")
# Defaults where the user gives no limit (never above the model's positions): memory for activations grows with
# prompt x positions, so a 128k-position model does not get a profile (and a workspace) for 128k by default.
DEFAULT_MAX_TOTAL, DEFAULT_MAX_SEQUENCE = 4096, 1024


@dataclass(frozen=True)
class ProfileLimits:
    """What the profiles cover (max) and what they are tuned for (opt)."""

    max_batch: int  # rows per call
    max_sequence: int  # longest prompt (tokens of one prefill)
    max_total: int  # longest sequence: prompt + new tokens (positions held by a cache)
    opt_batch: int
    opt_sequence: int  # typical prompt
    opt_total: int  # typical decode context

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def limits_for(record: GraphInfo, max_batch: int | None = None, max_sequence: int | None = None,
               max_total: int | None = None, opt_batch: int | None = None, opt_sequence: int | None = None,
               opt_total: int | None = None) -> ProfileLimits:
    """The limits; by default the record's `tensorrt_profile` hints (`xlora-export --max-batch`, the model's
    positions) capped at `DEFAULT_MAX_TOTAL` positions and `DEFAULT_MAX_SEQUENCE`-token prompts; opt points
    default to batch 1 and half of each maximum.

    Raises:
        XLoraError: a limit < 1, a prompt longer than the total, a total beyond the model's positions, an opt point
            outside 1..max (2..max for the decode context).
    """
    hints, positions = record.tensorrt_profile, record.max_positions
    b = max_batch if max_batch is not None else hints.max_batch
    t = max_total if max_total is not None else min(hints.max_past, positions, DEFAULT_MAX_TOTAL)
    s = max_sequence if max_sequence is not None else min(hints.max_sequence, t, DEFAULT_MAX_SEQUENCE)
    for flag, value in (("--max-batch", b), ("--max-sequence", s)):
        if value < 1:
            raise XLoraError(f"{flag} {value}: expected an int >= 1")
    if t < 2:
        raise XLoraError(f"--max-total {t}: expected an int >= 2 (a prompt token and a new one)")
    if t > positions:
        raise XLoraError(f"--max-total {t}: the model has {positions} positions (max_position_embeddings)")
    if s > t:
        raise XLoraError(f"--max-sequence {s}: longer than --max-total {t}")
    ob = 1 if opt_batch is None else opt_batch
    os_ = (s + 1) // 2 if opt_sequence is None else opt_sequence
    ot = max(2, (t + 1) // 2) if opt_total is None else opt_total
    for flag, value, low, high in (("--opt-batch", ob, 1, b), ("--opt-sequence", os_, 1, s),
                                   ("--opt-total", ot, 2, t)):
        if not low <= value <= high:
            raise XLoraError(f"{flag} {value}: expected {low}..{high}")
    return ProfileLimits(b, s, t, ob, os_, ot)


def input_dims(record: GraphInfo) -> dict[str, tuple[str | int, ...]]:
    """Every input of the graph the record describes (main or frozen), in graph order, with its contract dims:
    symbolic names (`batch`, `sequence`, `past_sequence`, `total_sequence`) or fixed sizes."""
    frozen = record.graph == C.GRAPH_FROZEN
    dims: dict[str, tuple[str | int, ...]] = {C.INPUT_IDS: (C.BATCH, C.SEQUENCE),
                                              C.ATTENTION_MASK: (C.BATCH, C.TOTAL_SEQUENCE),
                                              C.POSITION_IDS: (C.BATCH, C.SEQUENCE)}
    for cache in record.caches.values():
        dims.update({name: tuple(cache.shape) for name in cache.inputs})
    if frozen:
        dims[C.SCALINGS] = (C.BATCH, record.n_modules, record.n_experts)
    dims[C.TOP_K] = ()
    return {name: dims[name] for name in C.input_names(record.num_layers, frozen)}


def _phase_dims(limits: ProfileLimits, phase: str) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) of each symbolic dimension in one profile (see the module's table)."""
    b = (1, limits.opt_batch, limits.max_batch)
    if phase == "prefill":
        s = (1, limits.opt_sequence, limits.max_sequence)
        return {C.BATCH: b, C.SEQUENCE: s, C.PAST_SEQUENCE: (0, 0, 0), C.TOTAL_SEQUENCE: s}
    t = (2, limits.opt_total, limits.max_total)
    return {C.BATCH: b, C.SEQUENCE: (1, 1, 1), C.PAST_SEQUENCE: tuple(v - 1 for v in t), C.TOTAL_SEQUENCE: t}


def profile_shapes(dims: dict[str, tuple[str | int, ...]], symbols: dict[str, tuple[int, int, int]]) -> Shapes:
    """(min, opt, max) shapes of every input with a symbolic dimension (fixed inputs need no profile entry)."""
    shapes: Shapes = {}
    for name, shape in dims.items():
        if any(isinstance(d, str) for d in shape):
            shapes[name] = tuple(tuple(symbols[d][k] if isinstance(d, str) else int(d) for d in shape)
                                 for k in range(3))
    return shapes


def engine_profiles(record: GraphInfo, limits: ProfileLimits,
                    extra: dict[str, tuple[str | int, ...]] | None = None) -> list[Shapes]:
    """The engine's profiles, [prefill, decode] (index = `PHASES` index).

    Args:
        extra: inputs a served copy of the graph adds (name -> dims), e.g. the Triton repository's controls.
    """
    dims = {**input_dims(record), **(extra or {})}
    return [profile_shapes(dims, _phase_dims(limits, phase)) for phase in PHASES]


def wide_profile(record: GraphInfo, limits: ProfileLimits) -> Shapes:
    """One profile holding prefill and decode calls, tuned at decode's opt point and consistent at its corners
    (see the module's table): for ONNX Runtime's TensorRT execution provider, which runs every call through one
    profile."""
    s, t = limits.max_sequence, limits.max_total
    symbols = {C.BATCH: (1, limits.opt_batch, limits.max_batch), C.SEQUENCE: (1, 1, s),
               C.PAST_SEQUENCE: (0, limits.opt_total - 1, t - 1), C.TOTAL_SEQUENCE: (1, limits.opt_total, t + s - 1)}
    return profile_shapes(input_dims(record), symbols)


def check_profile(record: GraphInfo, shapes: Shapes) -> None:
    """Assert a profile's consistency at min, opt and max: min <= opt <= max per dimension, every cache input
    one shape, the mask's width = past + new tokens, fixed dimensions as the record says.

    Raises:
        XLoraError: naming the input and the point where it fails (a profile not built by this module).
    """
    dims = input_dims(record)
    for name, (low, opt, high) in shapes.items():
        if not all(a <= b <= c for a, b, c in zip(low, opt, high)):
            raise XLoraError(f"profile input {name}: min {low} <= opt {opt} <= max {high} does not hold")
        fixed = [(i, d) for i, d in enumerate(dims[name]) if not isinstance(d, str)]
        if any(point[i] != d for point in (low, opt, high) for i, d in fixed):
            raise XLoraError(f"profile input {name}: fixed dimensions {dims[name]} differ from {low}..{high}")
    caches = [name for name, d in dims.items() if C.PAST_SEQUENCE in d]
    for k, point in enumerate(("min", "opt", "max")):
        first = shapes[caches[0]][k]
        odd = [name for name in caches if shapes[name][k] != first]
        if odd:
            raise XLoraError(f"profile {point}: cache input {odd[0]} is {shapes[odd[0]][k]}, {caches[0]} {first}")
        past, new, total = first[2], shapes[C.INPUT_IDS][k][1], shapes[C.ATTENTION_MASK][k][1]
        if past + new != total:
            raise XLoraError(f"profile {point}: attention_mask width {total} != past {past} + sequence {new}")


def select_profile(profiles: list[Shapes], shapes: dict[str, tuple[int, ...]]) -> int:
    """Index of the first profile whose range holds every given input shape.

    Raises:
        XLoraError: no profile holds them (names the first input out of range of the last profile tried).
    """
    miss = ""
    for index, profile in enumerate(profiles):
        out = [name for name, shape in shapes.items() if name in profile and not all(
            lo <= v <= hi for lo, v, hi in zip(profile[name][0], shape, profile[name][2]))]
        if not out:
            return index
        name = out[0]
        miss = f"{name} {tuple(shapes[name])} is outside {profile[name][0]}..{profile[name][2]}"
    raise XLoraError(f"no optimization profile of the engine holds this step ({miss}); rebuild it with larger "
                     f"--max-batch/--max-sequence/--max-total")


def ort_tensorrt_options(shapes: Shapes) -> dict[str, str]:
    """`trt_profile_min_shapes`/`opt`/`max` provider options of ONNX Runtime's TensorRT execution provider
    ("name:d0xd1x...,name:..."): with them it builds one engine for the whole range instead of rebuilding when
    a shape leaves what it has seen."""
    keys = ("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes")
    return {key: ",".join(f"{name}:{'x'.join(map(str, point[k]))}" for name, point in shapes.items())
            for k, key in enumerate(keys)}
