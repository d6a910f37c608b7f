"""`export`: an X-LoRA checkpoint -> one ONNX graph holding both passes (the graph contract: docs/EXPORT.md).

    load checkpoint + base -> trace XLoraGraph (TorchScript exporter) -> metadata, onnx.checker
    -> [frozen graph] -> tokenizer -> validate with ONNX Runtime -> TensorRT readiness -> rename into place

Everything is written into a temporary folder beside OUT.onnx and renamed only after every
check passed, so a failed or interrupted export leaves no OUT.onnx.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import onnx
import torch
import transformers

from xlora_runtime.format import contract as C
from xlora_runtime.format.record import GraphInfo
from xlora_runtime.session import open_graph

from . import __version__
from .architectures import DYNAMIC_ROPE_TYPES, DecoderSpec
from .checkpoints import TOKENIZER_FILE, Checkpoint, read_checkpoint
from .errors import XLoraError
from .experts import follow_umask
from .graph import XLoraGraph
from .model import xLoRAModel
from .onnx_passes import WeightStore, attach_weights, fold_constants, fp16_weights_per_use
from .quantize import QuantizeOptions, QuantizeReport, quantize_export
from .trt_check import Finding, check_tensorrt, op_counts
from .validate import (
    EagerReference,
    ParityResult,
    compare_with_reference,
    eager_reference,
    frozen_scalings,
    size_factor,
    tolerance,
)
from .xlora_utils import load_model

__all__ = ["DTYPES", "ExportOptions", "ExportReport", "export"]

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
EXTERNAL_DATA_THRESHOLD = 1_800_000_000  # bytes of weights above which the graph uses external data (2 GB limit)


@dataclass
class ExportOptions:
    """What `xlora-export` was asked for (defaults = the CLI's)."""

    dtype: str = "fp32"
    opset: int = 17
    frozen_scalings: bool = False
    all_logits: bool = False  # logits of every position (scoring), not only the last one (generation)
    attention: str = C.ATTENTION_ONNX  # or C.ATTENTION_GQA: ONNX Runtime's GroupQueryAttention (contract.py)
    atol: float | None = None  # logits tolerance (default: `validate.tolerance`)
    atol_scalings: float | None = None  # scalings tolerance (default: `validate.tolerance`)
    validate: bool = True
    force: bool = False
    external_data: bool = False
    base_model: str | None = None
    validation_steps: int = 8
    max_batch: int = 8  # TensorRT profile hint
    quantize: QuantizeOptions | None = None  # int8/int4 graphs (quantize.py), checked against the float ones


@dataclass
class ExportReport:
    """What was written and measured."""

    files: list[str] = field(default_factory=list)
    inputs: list[tuple[str, str, list]] = field(default_factory=list)
    outputs: list[tuple[str, str, list]] = field(default_factory=list)
    op_counts: dict[str, int] = field(default_factory=dict)
    size_bytes: int = 0
    parity: dict[str, ParityResult] = field(default_factory=dict)
    validation_skipped: str | None = None
    tensorrt_findings: list[Finding] = field(default_factory=list)
    metadata: GraphInfo | None = None  # the two-pass graph's metadata record
    quantization: QuantizeReport | None = None


def _say(progress: Callable[[str], None] | None, message: str) -> None:
    if progress is not None:
        progress(message)


def _companions(out_path: str, options: ExportOptions) -> list[str]:
    """Every file an export to `out_path` may write."""
    return [out_path, out_path + ".data", C.frozen_path(out_path), C.frozen_path(out_path) + ".data",
            C.tokenizer_path(out_path), C.chat_template_path(out_path)]


def _check_output(out_path: str, options: ExportOptions) -> None:
    folder = os.path.dirname(os.path.abspath(out_path))
    if not os.path.isdir(folder):
        raise XLoraError(f"{out_path}: output folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise XLoraError(f"{out_path}: output folder {folder} is not writable")
    if os.path.isdir(out_path):
        raise XLoraError(f"{out_path}: is a directory, expected a file path such as model.onnx")
    existing = [p for p in _companions(out_path, options) if os.path.exists(p)]
    if existing and not options.force:
        raise XLoraError(f"{existing[0]} already exists (use --force to overwrite)")


def _load(model_dir: str, options: ExportOptions) -> tuple[Checkpoint, xLoRAModel]:
    """The checkpoint, read once, and the eager model built from it."""
    if options.base_model is not None and not os.path.isdir(options.base_model):
        raise XLoraError(f"--base-model {options.base_model}: not a folder")
    checkpoint = read_checkpoint(model_dir, base_model=options.base_model)
    model = load_model(checkpoint, dtype=DTYPES[options.dtype])[0]
    if model.spec.rope_type in DYNAMIC_ROPE_TYPES:
        raise XLoraError(f"{model_dir}: rope_type {model.spec.rope_type!r} changes with the sequence length at run "
                         f"time and cannot be fixed in a graph")
    model.eval()
    model.spec = dataclasses.replace(model.spec, attention_op=options.attention)
    return checkpoint, model


def _example_inputs(model: xLoRAModel, frozen: bool) -> tuple[torch.Tensor, ...]:
    """Trace inputs: batch 2, 3 new tokens after 2 past positions (every axis distinct and > 1)."""
    cfg, spec = model.config, model.spec
    b, s, p = 2, 3, 2
    dtype = model.model.lm_head.weight.dtype
    ids = torch.randint(0, cfg.vocab_size, (b, s))
    mask = torch.ones(b, p + s, dtype=torch.int64)
    pos = torch.arange(p, p + s).expand(b, s).contiguous()
    n_past = 2 * cfg.num_hidden_layers * (1 if frozen else 2)
    past = [torch.zeros(b, spec.kv_heads, p, spec.head_dim, dtype=dtype) for _ in range(n_past)]
    extra = [torch.full((b, len(model.module_names), len(model.adapter_names)), 0.5, dtype=dtype)] if frozen else []
    return (ids, mask, pos, *past, *extra, torch.tensor(0, dtype=torch.int64))


def _record(model: xLoRAModel, options: ExportOptions, out_path: str, frozen: bool, tokenizer_file: str | None,
            checkpoint: Checkpoint, chat_template_file: str | None) -> GraphInfo:
    """The metadata record of the two-pass graph OUT.onnx, or of the frozen graph (`frozen`)."""
    cfg, spec = model.config, model.spec
    gen = getattr(model.model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    eos = cfg.eos_token_id if eos is None else eos
    return GraphInfo.build(
        C.frozen_path(out_path) if frozen else out_path, frozen=frozen, producer=f"xlora-export {__version__}",
        versions={"xlora_export": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                  "onnx": onnx.__version__},
        source=os.path.abspath(checkpoint.directory),
        classifier_sha256=checkpoint.classifier_digest(),  # identifies the checkpoint (xlora-parity checks it)
        architecture=cfg.model_type, dtype=options.dtype, opset=options.opset, num_layers=cfg.num_hidden_layers,
        kv_heads=spec.kv_heads, head_dim=spec.head_dim, hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size,
        max_positions=cfg.max_position_embeddings, module_names=model.module_names, expert_names=model.adapter_names,
        config=model.xlora_config.to_dict(), default_top_k=model.xlora_config.top_k_lora or 0,
        all_logits=options.all_logits, attention=options.attention,
        eos_token_ids=[eos] if isinstance(eos, int) else list(eos or []), pad_token_id=cfg.pad_token_id,
        bos_token_id=cfg.bos_token_id, max_batch=options.max_batch,
        frozen_file=os.path.basename(C.frozen_path(out_path)) if options.frozen_scalings else None,
        tokenizer_file=tokenizer_file, chat_template_file=chat_template_file)


def chat_template(tokenizer_folder: str) -> str | None:
    """The chat template of the tokenizer in `tokenizer_folder`: `chat_template.jinja`, else the `chat_template` of
    `tokenizer_config.json` (a string, or a list of {name, template} of which "default" is taken); None if none.

    Raises:
        XLoraError: a `chat_template` that is neither.
    """
    path = os.path.join(tokenizer_folder, "chat_template.jinja")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    path = os.path.join(tokenizer_folder, "tokenizer_config.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        try:
            template = json.load(f).get("chat_template")
        except (json.JSONDecodeError, AttributeError):
            return None  # transformers reads this file; a broken one is not the chat template's concern
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise XLoraError(f"{path}: chat_template: expected a string or a list of {{name, template}} objects with a "
                         f"\"default\" one")
    return template


@contextlib.contextmanager
def _weights_kept_from_shape_inference() -> Iterator[None]:
    """Hide the weights' values from the TorchScript exporter's ONNX shape inference.

    With `export_params=False` the weights are graph inputs whose types the trace already knows, but the
    exporter still hands their values to its shape inference, which serialises them: on a 1.1B fp32 model
    most of a minute per graph and gigabytes of copies, for nothing (no shape depends on a weight's values).
    This replaces the exporter's private `_get_named_param_dict` for the call; where a torch version lacks
    it, the export is merely slower. `test_export.py` checks that the graph is identical either way.
    """
    try:
        from torch.onnx._internal.torchscript_exporter import utils as exporter_utils
    except ImportError:
        yield
        return
    original = getattr(exporter_utils, "_get_named_param_dict", None)
    if original is None:
        yield
        return
    exporter_utils._get_named_param_dict = lambda graph, params: {}
    try:
        yield
    finally:
        exporter_utils._get_named_param_dict = original


def _trace(model: xLoRAModel, path: str, options: ExportOptions, frozen: bool, metadata: GraphInfo,
           store: WeightStore) -> onnx.ModelProto:
    """Trace one graph to `path`, its weights attached from `store` (see `onnx_passes`), with metadata; checked."""
    n = model.config.num_hidden_layers
    wrapper = XLoraGraph(model, frozen=frozen, all_logits=options.all_logits)
    raw_dir = tempfile.mkdtemp(dir=os.path.dirname(path))
    raw = os.path.join(raw_dir, "raw.onnx")
    try:
        with warnings.catch_warnings(), _weights_kept_from_shape_inference():
            warnings.simplefilter("ignore")  # TracerWarnings on shape checks, the TorchScript deprecation notice
            torch.onnx.export(wrapper, _example_inputs(model, frozen), raw,
                              input_names=C.input_names(n, frozen), output_names=C.output_names(n, frozen),
                              dynamic_axes=C.dynamic_axes(n, frozen, options.all_logits),
                              opset_version=options.opset, dynamo=False, export_params=False, do_constant_folding=False,
                              custom_opsets={C.ORT_DOMAIN: 1} if options.attention == C.ATTENTION_GQA else None)
        proto = onnx.load(raw)
    finally:
        shutil.rmtree(raw_dir, ignore_errors=True)
    fold_constants(proto)
    if not options.all_logits:  # logits of the last position: the trace names that axis, it is a static 1
        logits = next(o for o in proto.graph.output if o.name == C.LOGITS).type.tensor_type.shape.dim[1]
        logits.ClearField("dim_param")
        logits.dim_value = 1
    weights = dict(wrapper.named_buffers(remove_duplicate=False))
    weights.update(wrapper.named_parameters(remove_duplicate=False))
    # names as in xLoRAModel.named_parameters() (the wrapper adds one "model." level)
    attach_weights(proto, weights, store, rename={name: name.removeprefix("model.") for name in weights})
    proto.producer_name, proto.producer_version = "xlora-export", __version__
    entry = proto.metadata_props.add()
    entry.key, entry.value = C.METADATA_KEY, metadata.to_json()
    onnx.save_model(proto, path)
    try:
        onnx.checker.check_model(path, full_check=True)
    except onnx.checker.ValidationError as e:
        raise XLoraError(f"onnx.checker rejected the traced graph: {str(e).splitlines()[0]}") from None
    return proto




def _eager_references(model: xLoRAModel, kinds: list[str], options: ExportOptions,
                      progress: Callable[[str], None] | None) -> dict[str, list[EagerReference]]:
    """Validation, phase 1: the eager model's decoding for every top_k the graphs accept (0..n), per graph:
    the configured top_k over all the decode steps, the others over the prefill and one decode step (the
    cache path does not depend on top_k; the prefill covers every position)."""
    configured = model.xlora_config.top_k_lora or 0
    top_ks = list(range(len(model.adapter_names) + 1))
    _say(progress, f"running the eager model for validation (batch 2, left padding; top_k={configured}: prefill + "
                   f"{options.validation_steps} decode steps, other top_k in 0..{top_ks[-1]}: prefill + 1; "
                   f"{' and '.join(kinds)} graph)")
    fixed = frozen_scalings(model) if "frozen" in kinds else None  # the same for every top_k: one forward
    return {kind: [eager_reference(model, k, options.validation_steps if k == configured else 1,
                                   frozen=kind == "frozen", fixed=fixed) for k in top_ks] for kind in kinds}


def _validate(references: dict[str, list[EagerReference]], spec: DecoderSpec, hidden_size: int,
              report: ExportReport, paths: dict[str, str], options: ExportOptions,
              progress: Callable[[str], None] | None) -> None:
    """Validation, phase 2: each graph alone (the eager model already released) against the references."""
    factor = size_factor(spec.num_layers, hidden_size)
    for kind, refs in references.items():
        _say(progress, f"validating the {kind} graph with ONNX Runtime")
        path = paths[kind]
        if options.dtype == "fp16":  # the CPU provider's fp32 copies of fp16 weights, one at a time
            path = os.path.join(os.path.dirname(path), ".validate." + os.path.basename(path))
            fp16_weights_per_use(paths[kind], path)
        try:
            session = open_graph(path, lean=True)  # the weights held once while the eager references wait
            results = [compare_with_reference(r, session, spec.num_layers, spec.kv_heads, spec.head_dim)
                       for r in refs]
            del session
        finally:
            if path != paths[kind]:
                os.remove(path)
        worst = ParityResult(steps=options.validation_steps)
        for r in results:
            for name, diff in r.max_diff.items():
                worst.max_diff[name] = max(worst.max_diff.get(name, 0.0), diff)
            worst.logits_magnitude = max(worst.logits_magnitude, r.logits_magnitude)
            worst.token_mismatches += r.token_mismatches
            worst.skipped_positions += r.skipped_positions
        tolerances = {name: tolerance(options.dtype, name, worst.logits_magnitude, factor) for name in worst.max_diff}
        if options.atol is not None:
            tolerances[C.LOGITS] = options.atol
        if options.atol_scalings is not None and C.SCALINGS in tolerances:
            tolerances[C.SCALINGS] = options.atol_scalings
        worst.tolerances = tolerances
        report.parity[kind] = worst
        for name, diff in worst.max_diff.items():
            if not diff <= tolerances[name]:
                raise XLoraError(f"validation failed: {kind} graph output '{name}' differs from the eager model by "
                                 f"{diff:.3g} (tolerance {tolerances[name]:.2g}); no file was written")
        if worst.token_mismatches:
            raise XLoraError(f"validation failed: the {kind} graph chose another greedy token than the eager model "
                             f"{worst.token_mismatches} time(s) where the eager choice was clear; no file was written")


def _io(proto: onnx.ModelProto) -> tuple[list, list]:
    def describe(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_param or d.dim_value for d in t.shape.dim]
            out.append((v.name, onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, dims))
        return out

    return describe(proto.graph.input), describe(proto.graph.output)


def export(model_dir: str, out_path: str, options: ExportOptions | None = None,
           progress: Callable[[str], None] | None = None) -> ExportReport:
    """Export the X-LoRA checkpoint in `model_dir` to `out_path` (see the module docstring).

    Raises:
        XLoraError: bad input, unsupported model, failed check or validation (nothing is written then).
    """
    options = options or ExportOptions()
    if options.dtype not in DTYPES:
        raise XLoraError(f"--dtype {options.dtype!r}: expected one of {', '.join(DTYPES)}")
    if not C.OPSET_MIN <= options.opset <= C.OPSET_MAX:
        raise XLoraError(f"opset {options.opset}: expected {C.OPSET_MIN} to {C.OPSET_MAX} (the graph needs "
                         f"{C.OPSET_MIN}, torch's TorchScript exporter stops at {C.OPSET_MAX}; 17 is the default)")
    if options.attention not in C.ATTENTIONS:
        raise XLoraError(f"--attention {options.attention!r}: expected one of {', '.join(C.ATTENTIONS)}")
    if options.quantize is not None:
        options.quantize.check(options.dtype)
    _check_output(out_path, options)
    report = ExportReport()
    t0 = time.perf_counter()
    _say(progress, f"loading {model_dir} ({options.dtype})")
    checkpoint, model = _load(model_dir, options)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    # the frozen graph shares the main graph's weights file, so both are then external
    external = options.external_data or options.frozen_scalings or weight_bytes > EXTERNAL_DATA_THRESHOLD
    folder = os.path.dirname(os.path.abspath(out_path))
    name = os.path.basename(out_path)
    tmp = tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    try:
        staged = {"main": os.path.join(tmp, name)}
        tokenizer_file = os.path.basename(C.tokenizer_path(out_path)) if checkpoint.tokenizer else None
        if checkpoint.tokenizer:
            shutil.copyfile(os.path.join(checkpoint.tokenizer, TOKENIZER_FILE), os.path.join(tmp, tokenizer_file))
        template = chat_template(checkpoint.tokenizer) if checkpoint.tokenizer else None
        template_file = os.path.basename(C.chat_template_path(out_path)) if template is not None else None
        if template is not None:
            with open(os.path.join(tmp, template_file), "w", encoding="utf-8") as f:
                f.write(template)
        _say(progress, f"tracing the two-pass graph (opset {options.opset}, "
                       f"{'external data' if external else 'weights inside'})")
        # one weights file for both graphs (same offsets), or the weights inside the single graph
        store = WeightStore(os.path.join(tmp, name + ".data") if external else None)
        report.metadata = _record(model, options, out_path, False, tokenizer_file, checkpoint, template_file)
        try:
            main = _trace(model, staged["main"], options, False, report.metadata, store)
            if options.frozen_scalings:
                _say(progress, "tracing the frozen-scalings graph (sharing the weights file)")
                staged["frozen"] = os.path.join(tmp, os.path.basename(C.frozen_path(out_path)))
                _trace(model, staged["frozen"], options, True,
                       _record(model, options, out_path, True, tokenizer_file, checkpoint, template_file), store)
        finally:
            store.close()
        report.inputs, report.outputs = _io(main)
        report.op_counts = dict(op_counts(main).most_common())
        _say(progress, "checking TensorRT readiness")
        report.tensorrt_findings = check_tensorrt(main)
        if not options.validate:
            report.validation_skipped = "--no-validate"
        elif options.dtype == "bf16":
            # numpy has no bf16, so feeding a bf16 graph needs device-side buffers (IO binding on a GPU
            # provider); that path is not written yet.
            report.validation_skipped = ("bf16 graphs cannot run on ONNX Runtime's CPU provider (no bf16 MatMul); "
                                         "validating them on a GPU execution provider is not implemented yet")
        else:
            references = _eager_references(model, list(staged), options, progress)
            spec, hidden_size = model.spec, model.config.hidden_size
            del model  # the graphs are checked alone: peak memory is one copy of the weights, not three
            gc.collect()
            _validate(references, spec, hidden_size, report, staged, options, progress)
        if options.quantize is not None:  # the validated float graphs are the reference, then replaced
            quantize_export(staged, options.quantize, report, options.validate, progress)
        _say(progress, f"writing {out_path} and its companions")
        follow_umask(tmp)  # the mode of any new file, whatever a writer chose (safetensors, onnx: 0600)
        staged_files = sorted(os.listdir(tmp), key=lambda f: f == name)  # OUT.onnx renamed last
        for stale in _companions(out_path, options):  # with --force: an older export's other files
            if os.path.basename(stale) not in staged_files and os.path.isfile(stale):
                os.remove(stale)
        for f in staged_files:
            os.replace(os.path.join(tmp, f), os.path.join(folder, f))
            report.files.append(os.path.join(folder, f))
        report.size_bytes = sum(os.path.getsize(f) for f in report.files if not f.endswith(".json"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _say(progress, f"done in {time.perf_counter() - t0:.1f} s")
    return report
