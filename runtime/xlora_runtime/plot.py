"""Scalings as a picture: a token-by-expert heatmap, and the token sequence of one row of a scalings log.

    log (list of (b, s, L, n)) --row_scalings--> (tokens, L, n) --plot_scalings--> PNG
                                                 one module, or the mean over modules

matplotlib is optional (`pip install "./runtime[plot]"`) and imported only when a plot is drawn; the
figure is built with matplotlib's object API on the Agg canvas, so pyplot's global state is never touched.
"""

from __future__ import annotations

import math
import os
import secrets
from typing import Any

import numpy as np

from .errors import XLoraError, brief

__all__ = ["MAX_TOKEN_LABELS", "plot_scalings", "row_scalings", "tick_positions", "token_label"]

MAX_TOKEN_LABELS = 64  # more tokens than this: only every k-th one is labelled


def tick_positions(count: int, max_labels: int = MAX_TOKEN_LABELS) -> list[int]:
    """Indices of the tokens that get a label: all of them, or every k-th so that at most `max_labels` remain."""
    step = max(1, math.ceil(count / max_labels))
    return list(range(0, count, step))


def token_label(piece: str | None, token: int) -> str:
    """A readable axis label for a token: its text with whitespace made visible and control characters
    escaped, else `#id`."""
    if not piece:
        return f"#{token}"
    if not piece.strip():
        return repr(piece)[1:-1].replace(" ", "\u2423")  # whitespace made visible
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in piece)


def plot_scalings(scalings: np.ndarray, path: str, expert_names: list[str], token_labels: list[str] | None = None,
                  module: int | None = None, module_name: str | None = None, title: str | None = None) -> str:
    """Draw the scalings of a token sequence as a heatmap PNG: tokens across, experts down.

    Args:
        scalings: (tokens, L, n): L scaled modules, n experts.
        path: the PNG to write (written to a temporary file beside it, then renamed).
        expert_names: n names for the y axis.
        token_labels: one label per token for the x axis (default: the token indices); rotated, and thinned
            to at most MAX_TOKEN_LABELS.
        module: plot module `module` only (0..L-1); default: the mean over the L modules.
        module_name: the module's name, for the default title.
        title: the figure title (default: says which module, or the mean).
    Returns:
        `path`.
    Raises:
        XLoraError: shapes or names that do not match, a module out of range, an output folder that does not
            exist, matplotlib missing, a file-system error while writing (one line naming `path`).
    """
    scalings = np.asarray(scalings)
    if scalings.ndim != 3 or 0 in scalings.shape:
        raise XLoraError(f"scalings of shape {scalings.shape}: expected a non-empty (tokens, L modules, n experts)")
    tokens, n_modules, n_experts = scalings.shape
    if len(expert_names) != n_experts:
        raise XLoraError(f"{len(expert_names)} expert names for {n_experts} experts")
    if token_labels is not None and len(token_labels) != tokens:
        raise XLoraError(f"{len(token_labels)} token labels for {tokens} tokens")
    if module is not None and not 0 <= module < n_modules:
        raise XLoraError(f"module {module}: expected 0..{n_modules - 1}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise XLoraError(f"{path}: the folder {folder} does not exist")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise XLoraError('plotting needs matplotlib: pip install "./runtime[plot]"') from None

    if module is None:
        values, what = scalings.mean(axis=1), f"mean over {n_modules} modules"
    else:
        values, what = scalings[:, module], f"module {module}" + (f" ({module_name})" if module_name else "")
    labels = [str(i) for i in range(tokens)] if token_labels is None else [str(t) for t in token_labels]
    shown = tick_positions(tokens)

    width = min(20.0, max(6.0, 2.5 + 0.2 * len(shown)))
    height = min(12.0, max(3.0, 1.8 + 0.35 * n_experts))
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(values.T.astype(np.float32), aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set_xticks(shown, [labels[i] for i in shown], rotation=60, ha="right", rotation_mode="anchor", fontsize=8)
    ax.set_yticks(range(n_experts), expert_names, fontsize=9)
    ax.set_xlabel("token")
    ax.set_ylabel("expert")
    ax.set_title(title or f"X-LoRA scalings, {what}", fontsize=10)
    fig.colorbar(image, ax=ax, label="scaling", pad=0.01)
    _save_png(fig, path)
    return path


def _save_png(fig: Any, path: str) -> None:
    """Write the figure beside `path`, then rename: an interrupted save never leaves a half PNG at `path`.
    The temporary file is created with mode 0666 less the umask, as `open` would create `path` itself.

    Raises:
        XLoraError: the file system refused (a folder that cannot be written, a directory at `path`, a full disk):
            `<path>: cannot write it (<the OS's reason>)`.
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".plot-{os.getpid()}-{secrets.token_hex(4)}.png")
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as f:
            fig.savefig(f, format="png", dpi=110)
        os.replace(tmp, path)
    except OSError as e:
        raise XLoraError(f"{path}: cannot write it ({e.strerror or e})") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def row_scalings(log: list[np.ndarray], row: int = 0, include_prompt: bool = False,
                 record: dict[str, Any] | None = None, call: int | None = None) -> tuple[np.ndarray, list[str]]:
    """The scalings of one sequence of a generation's log, position by position, with axis labels.

    A log of one `generate` call holds the prefill (b, s, L, n) and then one (b, 1, L, n) entry per decode step,
    every row in prompt order (the eager model's layout, which the runtime follows). Each token is chosen by the
    scalings of the position before it: the prefill's last position chose the first new token, decode entry k
    chose token k. A runtime row that has finished is NaN in later entries (the eager model keeps running it on
    padding); a frozen row repeats its fixed scalings, whenever it froze.

    Args:
        log: the arrays of `load_scalings_arrays`.
        row: the prompt index (its row in every entry). Without `record`, the sequence is read from the log's
            first call and ends at the first entry where the row is NaN or missing, or at the next prefill.
        include_prompt: also the prefill's positions (left padding skipped when `record` gives the prompt).
        record: the tokens record (`PATH-tokens.json`) written with the log by the runtime.
        call: with `record`, which logged `generate` call (default 0).
    Returns:
        (tokens, L, n) scalings and one label per column: the token those scalings chose (its text from
        `record`, else `#id`; without `record`, "p<j>" for prompt position j and the step number after).
    Raises:
        XLoraError: an empty or malformed log, a row or call that does not exist, a record that does not match
            the log.
    """
    if not log:
        raise XLoraError("the scalings log is empty")
    shapes = {a.shape[2:] for a in log}
    if any(a.ndim != 4 for a in log) or len(shapes) != 1:
        raise XLoraError(f"scalings log entries of shapes {sorted({a.shape for a in log})}: expected (b, s, L, n) "
                         f"arrays with one L and n")
    if row < 0:
        raise XLoraError(f"row {row}: expected >= 0")
    if record is not None:
        return _recorded_row(log, row, include_prompt, record, 0 if call is None else call)
    if call is not None:
        raise XLoraError(f"call {call}: choosing a call needs the tokens record (PATH-tokens.json) beside the log")
    prefill = log[0]
    if row >= prefill.shape[0]:
        raise XLoraError(f"row {row}: the log's first entry has {prefill.shape[0]} rows")
    steps = [prefill[row]] if include_prompt else [prefill[row, -1:]]
    labels = [f"p{j}" for j in range(1, prefill.shape[1])] if include_prompt else []  # position chosen
    for entry in log[1:]:
        if entry.shape[1] != 1 or row >= entry.shape[0] or np.isnan(entry[row]).all():  # next call, or finished
            break
        steps.append(entry[row])
    values = np.concatenate(steps)
    labels += [str(k) for k in range(len(values) - len(labels))]
    return values, labels


def _recorded_row(log: list[np.ndarray], row: int, include_prompt: bool, record: dict[str, Any],
                  call: int) -> tuple[np.ndarray, list[str]]:
    """`row_scalings` for a log whose tokens record says which tokens each call's entries chose."""
    calls = record.get("calls")
    if not isinstance(calls, list) or not calls:
        raise XLoraError("the tokens record lists no calls")
    if not 0 <= call < len(calls):
        raise XLoraError(f"call {call}: the tokens record has {len(calls)} call(s)")
    try:
        first, count, prompts = int(calls[call]["first_entry"]), int(calls[call]["entries"]), calls[call]["prompts"]
        lengths = [len(p["tokens"]) for p in prompts]
        widths = [len(p["prompt_ids"]) for p in prompts]
    except (KeyError, TypeError, ValueError) as e:
        raise XLoraError(f"the tokens record is malformed ({brief(e)})") from None
    if not 0 <= row < len(prompts):
        raise XLoraError(f"row {row}: call {call} of the tokens record has {len(prompts)} prompts")
    if min(lengths, default=0) < 1:
        raise XLoraError(f"the tokens record is malformed (call {call} has a prompt without tokens)")
    width = max(widths)
    expected = [(len(prompts), width)] + [(len(prompts), 1)] * (max(lengths) - 1)
    actual = [a.shape[:2] for a in log[first:first + count]]
    if count != len(expected) or actual != expected:
        raise XLoraError(f"the tokens record does not describe this log: call {call} lists {count} entries from "
                         f"entry {first}, whose (rows, positions) are {_brief(actual)}; its prompts imply "
                         f"{_brief(expected)}")
    entries = log[first:first + count]
    prompt = prompts[row]
    values = [entries[0][row, width - widths[row]:] if include_prompt else entries[0][row, -1:]]
    values += [entry[row] for entry in entries[1:lengths[row]]]
    values = np.concatenate(values)
    labels = []
    if include_prompt:
        pieces = prompt.get("prompt_pieces") or [None] * widths[row]
        labels = [token_label(p, t) for p, t in zip(pieces[1:], prompt["prompt_ids"][1:])]
    pieces = prompt.get("pieces") or [None] * lengths[row]
    labels += [token_label(p, t) for p, t in zip(pieces, prompt["tokens"])]
    return values, labels


def _brief(shapes: list) -> str:
    text = ", ".join(f"({b}, {s})" for b, s in shapes[:6])
    return f"[{text}{', ...' if len(shapes) > 6 else ''}] ({len(shapes)} entries)"
