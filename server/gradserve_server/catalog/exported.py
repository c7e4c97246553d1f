"""Models from torch.export archives (.pt2), checked header-first and rebuilt without torch's loader.

torch.export.load must never see client bytes. In torch 2.13 it unpickles weights saved with
use_pickle (torch.load(weights_only=False)), TorchScript and opaque constants (pickle.loads) and,
when a weights-only load fails, the sample inputs; its deserializer evaluates symbolic shapes with
sympy.sympify (which runs eval), and ExportedProgram.module() exec()s the archive's guards_code.

So this module reads an archive the way safetensors reads a file: first the zip's end record and
central directory (member names, sizes, compression), then the JSON graph and the weight tables,
every size bounded; only then the raw weight bytes, as numbers. The graph is rebuilt as a
torch.fx graph whose every call is an operator of OPS (the one allow-list, docs/exported.md) or a
symbolic-size helper of PY_OPS. Nothing from the archive is unpickled, evaluated or imported, and
no name from it becomes code: node names are chosen here.

Train and eval mode: an archive holds the program "model" and, optionally, "eval" (the same module
exported in eval mode; gradserve.export writes both). Model runs in train mode, eval in eval mode;
without eval, model runs in both.
"""

from __future__ import annotations

import io
import json
import math
import operator
import re
import struct
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode

from ..core.errors import InvalidArgument, ResourceExhausted
from .layers import MAX_WINDOW, WINDOW_ARGS

# ------------------------------------------------------------------------------------ the tables

# ATen operators an exported graph may call, by their serialized name without the
# "torch.ops.aten." prefix. The criterion: a pure function of its arguments (randomness from
# torch's generator is fine), or an in-place update whose target the graph check below proves to
# be a buffer or a tensor the graph made itself (never an input or a parameter). No custom
# operators (other namespaces run code someone installed), no higher-order operators (none is
# needed for feed-forward, convolutional or attention modules; each would need its subgraphs
# checked and their effects on grad mode and control flow justified), no I/O, no assertions, no
# storage tricks (set_, resize_). An operator extends the table with --exported-ops.
OPS_BY_KIND: dict[str, str] = {
    "linear algebra": "linear.default matmul.default mm.default bmm.default addmm.default "
                      "baddbmm.default addmv.default mv.default dot.default einsum.default "
                      "outer.default scaled_dot_product_attention.default",
    "convolution": "conv1d.default conv2d.default conv3d.default conv1d.padding conv2d.padding "
                   "conv3d.padding conv_transpose1d.default conv_transpose2d.input "
                   "conv_transpose3d.input convolution.default",
    "pooling": "max_pool1d.default max_pool2d.default max_pool3d.default "
               "max_pool2d_with_indices.default avg_pool1d.default avg_pool2d.default "
               "avg_pool3d.default adaptive_avg_pool1d.default adaptive_avg_pool2d.default "
               "adaptive_avg_pool3d.default adaptive_max_pool1d.default "
               "adaptive_max_pool2d.default _adaptive_avg_pool2d.default",
    "normalisation": "layer_norm.default native_layer_norm.default batch_norm.default "
                     "_native_batch_norm_legit_functional.default "
                     "_native_batch_norm_legit_no_training.default group_norm.default "
                     "native_group_norm.default instance_norm.default rms_norm.default",
    "dropout": "dropout.default native_dropout.default feature_dropout.default "
               "alpha_dropout.default feature_alpha_dropout.default",
    "activations": "relu.default gelu.default silu.default mish.default elu.default "
                   "selu.default celu.default leaky_relu.default hardtanh.default "
                   "hardswish.default hardsigmoid.default softplus.default prelu.default "
                   "sigmoid.default tanh.default softmax.int log_softmax.int _softmax.default "
                   "_log_softmax.default glu.default log_sigmoid.default",
    "arithmetic": "add.Tensor add.Scalar sub.Tensor sub.Scalar rsub.Scalar rsub.Tensor "
                  "mul.Tensor mul.Scalar div.Tensor div.Scalar div.Tensor_mode neg.default "
                  "pow.Tensor_Scalar pow.Tensor_Tensor pow.Scalar reciprocal.default "
                  "square.default sqrt.default rsqrt.default exp.default expm1.default "
                  "log.default log1p.default log2.default abs.default sign.default "
                  "sin.default cos.default tan.default erf.default floor.default ceil.default "
                  "round.default trunc.default remainder.Scalar remainder.Tensor fmod.Scalar "
                  "clamp.default clamp.Tensor clamp_min.default clamp_max.default "
                  "minimum.default maximum.default lerp.Scalar addcmul.default addcdiv.default",
    "comparison and masks": "eq.Tensor eq.Scalar ne.Tensor ne.Scalar lt.Tensor lt.Scalar "
                            "le.Tensor le.Scalar gt.Tensor gt.Scalar ge.Tensor ge.Scalar "
                            "logical_not.default logical_and.default logical_or.default "
                            "where.self where.ScalarOther where.ScalarSelf where.Scalar "
                            "masked_fill.Scalar masked_fill.Tensor isnan.default",
    "reductions": "sum.default sum.dim_IntList mean.default mean.dim amax.default amin.default "
                  "max.default max.dim min.default min.dim argmax.default argmin.default "
                  "prod.default prod.dim_int var.correction var.dim std.correction std.dim "
                  "var_mean.correction logsumexp.default linalg_vector_norm.default "
                  "norm.ScalarOpt_dim cumsum.default all.default any.default any.dim",
    "shape and indexing": "view.default reshape.default _unsafe_view.default "
                          "flatten.using_ints unflatten.int permute.default transpose.int "
                          "t.default unsqueeze.default squeeze.default squeeze.dim "
                          "squeeze.dims expand.default expand_as.default contiguous.default "
                          "clone.default select.int slice.Tensor narrow.default "
                          "index_select.default index.Tensor gather.default cat.default "
                          "stack.default split.Tensor split_with_sizes.default chunk.default "
                          "unbind.int repeat.default tile.default flip.default roll.default "
                          "constant_pad_nd.default pad.default embedding.default "
                          "one_hot.default tril.default triu.default detach.default "
                          "alias.default lift_fresh_copy.default",
    "types and creation": "_to_copy.default to.dtype to.dtype_layout to.device type_as.default "
                          "zeros_like.default ones_like.default full_like.default "
                          "empty_like.default zeros.default ones.default full.default "
                          "new_zeros.default new_ones.default new_full.default arange.default "
                          "arange.start arange.start_step scalar_tensor.default",
    "in-place updates": "add_.Tensor add_.Scalar sub_.Tensor mul_.Tensor mul_.Scalar "
                        "div_.Tensor copy_.default fill_.Scalar zero_.default relu_.default "
                        "hardtanh_.default leaky_relu_.default elu_.default silu_.default "
                        "dropout_.default clamp_.default masked_fill_.Scalar",
    "symbolic sizes": "sym_size.int sym_numel.default",
    # Export inserts it before .to(): a re-check of the dtype and device it saw at export time.
    # Not run (SKIPPED): the model's dtype and device are the server's, so they may differ.
    "metadata checks (not run)": "_assert_tensor_metadata.default",
}
ATEN_PREFIX = "torch.ops.aten."
OPS: frozenset[str] = frozenset(ATEN_PREFIX + op for ops in OPS_BY_KIND.values()
                                for op in ops.split())

_VIEW = ATEN_PREFIX + "view.default"
SKIPPED: frozenset[str] = frozenset({ATEN_PREFIX + "_assert_tensor_metadata.default"})

# Python functions a graph uses for arithmetic on symbolic sizes (e.g. batch * heads); they act
# on integers only, which the graph check enforces.
PY_OPS: dict[str, Callable[..., Any]] = {
    "_operator.add": operator.add, "_operator.sub": operator.sub, "_operator.mul": operator.mul,
    "_operator.floordiv": operator.floordiv, "_operator.mod": operator.mod,
    "_operator.neg": operator.neg,
}

# Operators that update an argument in place without saying so in their schema.
# Argument values of allowed operators that produce what the server cannot serve: operator ->
# {argument: (refused value, why)}. Sparse gradients (as for layer specs, catalog/layers.py).
REFUSED_ARGS: dict[str, dict[str, tuple[Any, str]]] = {
    ATEN_PREFIX + "embedding.default": {"sparse": (True, (
        "sparse gradients are not supported (they cannot be returned, checkpointed or stepped "
        "by most optimizers); export the embedding with sparse=False"))},
}

HIDDEN_WRITES: dict[str, tuple[str, ...]] = {
    ATEN_PREFIX + "batch_norm.default": ("running_mean", "running_var"),
    ATEN_PREFIX + "instance_norm.default": ("running_mean", "running_var"),
}

# Never allowed, not even through --exported-ops: effects outside the graph or on storage.
DENIED: frozenset[str] = frozenset(ATEN_PREFIX + op for op in (
    "_print.default", "_assert_async.default", "_assert_async.msg", "_assert_scalar.default",
    "_functional_assert_async.msg", "_functional_assert_scalar.default",
    "sym_constrain_range.default", "sym_constrain_range_for_size.default",
    "_make_dep_token.default", "set_.source_Storage", "set_.source_Tensor", "set_.default",
    "resize_.default", "resize_as_.default", "record_stream.default", "_local_scalar_dense.default",
    "item.default", "to_mkldnn.default", "_nested_tensor_from_mask.default",
))

# Archive layout (torch/csrc/export/pt2_archive_constants.h): the programs this server reads.
PROGRAMS = ("model", "eval")
SCHEMA_MAJOR = 8  # torch.export's serialization schema (torch._export.serde.schema.SCHEMA_VERSION)
ARCHIVE_VERSION = b"0"
MAX_TEXT = 64                  # archive_format, archive_version, byteorder, .data/*
MAX_JSON = 64 * 1024 * 1024    # a graph or a weight table
MAX_RATIO = 100                # uncompressed/compressed size of a deflated member over 1 MiB
MAX_DIMS = 16
MAX_DIM = 1 << 40
MAX_NAME = 256

# Serialized enum values (torch._export.serde.schema) -> torch, for what a model may hold.
DTYPES: dict[int, torch.dtype] = {
    1: torch.uint8, 2: torch.int8, 3: torch.int16, 4: torch.int32, 5: torch.int64,
    6: torch.float16, 7: torch.float32, 8: torch.float64, 12: torch.bool, 13: torch.bfloat16,
}
LAYOUT_STRIDED = 7
MEMORY_FORMATS: dict[int, torch.memory_format] = {
    1: torch.contiguous_format, 2: torch.channels_last, 3: torch.channels_last_3d,
    4: torch.preserve_format,
}

_ROOT = r"[A-Za-z0-9_.-]{1,64}"
_PROG = "(model|eval)"
# Member name (below the archive's root folder) -> what it is.
_MEMBERS: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), kind) for pattern, kind in (
        (r"archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id",
         "text"),
        (rf"models/{_PROG}\.json", "graph"),
        (rf"data/weights/{_PROG}_weights_config\.json", "weights_config"),
        (rf"data/constants/{_PROG}_constants_config\.json", "constants_config"),
        (r"data/weights/weight_[0-9]{1,9}", "weight"),
        (r"data/constants/tensor_[0-9]{1,9}", "constant"),
        # torch.export.save always pickles the example inputs here; they are never read.
        (rf"data/sample_inputs/{_PROG}\.pt", "sample_inputs"),
    ))
# Members refused with a reason of their own.
_REFUSED: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), why) for pattern, why in (
        (r"data/constants/custom_obj_.*", ("a pickled TorchScript object (custom class "
                                          "constant); such programs are not accepted")),
        (r"data/constants/opaque_obj_.*", ("a pickled Python object (opaque constant); such "
                                          "programs are not accepted")),
        (r"data/(weights|constants)/[^/]*\.pt", ("pickled weights (the legacy format); save the "
                                                "program again with torch.export.save")),
        (r"data/aotinductor/.*|data/mtia.*|data/executorch/.*|xl_model_weights/.*",
         "compiled code or a foreign payload; upload the exported program alone"),
    ))


# ------------------------------------------------------------------------------------ op table


def _resolve(name: str) -> Any:
    """torch.ops.aten.<packet>.<overload> for a name of the table (or a checked setting)."""
    _, _, ns, packet, overload = name.split(".")
    return getattr(getattr(getattr(torch.ops, ns), packet), overload)


_EXTRA = re.compile(r"(?:torch\.ops\.)?aten\.[a-z0-9_]+\.[A-Za-z0-9_]+")


def check_extra_ops(names: Iterable[str]) -> list[str]:
    """Full names of the operators a server setting adds; ValueError says which one is wrong."""
    out = []
    for raw in names:
        if not _EXTRA.fullmatch(raw):
            raise ValueError(f"{raw!r}: expected an ATen operator overload such as "
                             "aten.erfinv.default (other namespaces are custom code)")
        name = raw if raw.startswith("torch.ops.") else "torch.ops." + raw
        if name in DENIED:
            raise ValueError(f"{raw!r} has effects outside the graph and cannot be allowed")
        try:
            _resolve(name)
        except (AttributeError, RuntimeError):
            raise ValueError(f"{raw!r}: no such operator in this torch") from None
        out.append(name)
    return out


@lru_cache(maxsize=8)
def allowed_ops(extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """Serialized target -> callable: the table plus the operators a setting adds."""
    table: dict[str, Any] = {}
    for name in sorted(OPS | set(check_extra_ops(extra))):
        try:
            table[name] = _resolve(name)
        except (AttributeError, RuntimeError):  # an overload this torch build lacks
            continue
    table.update(PY_OPS)
    return table


# ------------------------------------------------------------------------------------ limits


@dataclass(frozen=True)
class ArchiveLimits:
    """Bounds of one archive (from Settings: max_exported_mb, max_exported_nodes, ...)."""

    max_bytes: int = 64 * 1024 * 1024
    max_nodes: int = 10_000
    max_parameters: int = 500_000_000
    extra_ops: tuple[str, ...] = ()

    @property
    def max_members(self) -> int:
        return 2 * self.max_nodes + 64


def _mib(n: int) -> str:
    return f"{n / (1024 * 1024):g} MiB"


# ------------------------------------------------------------------------------------ zip


def _zip_entries(data: bytes) -> int:
    """Entry count from the end-of-central-directory record (the one zipfile itself will use),
    read before zipfile parses the directory: a directory of a million entries is refused
    without building a million ZipInfo objects."""
    try:
        end = zipfile._EndRecData(io.BytesIO(data))  # type: ignore[attr-defined]
    except (OSError, struct.error, ValueError):
        end = None
    if not end:
        raise InvalidArgument("spec.exported.archive: not a zip archive (no end record); "
                              "send the bytes torch.export.save wrote")
    return int(end[zipfile._ECD_ENTRIES_TOTAL])  # type: ignore[attr-defined]


def _kind(rel: str) -> str:
    for pattern, why in _REFUSED:
        if pattern.fullmatch(rel):
            raise InvalidArgument(f"spec.exported.archive: member {rel!r} is {why}")
    for pattern, kind in _MEMBERS:
        if pattern.fullmatch(rel):
            return kind
    raise InvalidArgument(f"spec.exported.archive: unknown member {rel!r}; an archive holds "
                          "only what torch.export.save writes for the programs 'model' and "
                          "'eval' (docs/exported.md)")


def _open_zip(data: bytes, limits: ArchiveLimits) -> tuple[zipfile.ZipFile,
                                                            dict[str, zipfile.ZipInfo]]:
    """Validate the member list (names, sizes, compression) before any member is read."""
    if len(data) > limits.max_bytes:
        raise ResourceExhausted(f"spec.exported.archive: {len(data)} bytes; the limit "
                                f"(max_exported_mb) is {_mib(limits.max_bytes)}")
    entries = _zip_entries(data)
    if entries > limits.max_members:
        raise ResourceExhausted(f"spec.exported.archive: {entries} members; at most "
                                f"{limits.max_members} (2 x max_exported_nodes + 64)")
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
        if len(infos) > limits.max_members:
            raise zipfile.BadZipFile("the directory holds more entries than its end record")
    except (zipfile.BadZipFile, ValueError, EOFError, OSError, NotImplementedError) as exc:
        raise InvalidArgument(f"spec.exported.archive: not a readable zip archive: {exc}") from None
    root = None
    members: dict[str, zipfile.ZipInfo] = {}
    total = 0
    for info in infos:
        name = info.filename
        head, sep, rel = name.partition("/")
        if (not sep or not re.fullmatch(_ROOT, head) or head in (".", "..") or "\\" in name
                or "\x00" in name or any(part in ("", ".", "..") for part in rel.split("/"))
                or len(name) > MAX_NAME):
            raise InvalidArgument(f"spec.exported.archive: member {name[:MAX_NAME]!r} has an "
                                  "unsafe or malformed path")
        if root is None:
            root = head
        elif head != root:
            raise InvalidArgument(f"spec.exported.archive: member {name!r} is outside the "
                                  f"archive's root folder {root!r}")
        kind = _kind(rel)
        if rel in members:
            raise InvalidArgument(f"spec.exported.archive: member {name!r} appears twice")
        if info.flag_bits & 0x1:
            raise InvalidArgument(f"spec.exported.archive: member {name!r} is encrypted")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise InvalidArgument(f"spec.exported.archive: member {name!r} uses compression "
                                  f"method {info.compress_type}; only stored or deflated")
        cap = {"text": MAX_TEXT, "graph": MAX_JSON, "weights_config": MAX_JSON,
               "constants_config": MAX_JSON}.get(kind, limits.max_bytes)
        if info.file_size > cap:
            raise ResourceExhausted(f"spec.exported.archive: member {name!r} holds "
                                    f"{info.file_size} bytes; at most {cap} for this member")
        if (info.compress_type == zipfile.ZIP_DEFLATED and info.file_size > 1024 * 1024
                and info.file_size > MAX_RATIO * max(1, info.compress_size)):
            raise InvalidArgument(f"spec.exported.archive: member {name!r} expands "
                                  f"{info.file_size // max(1, info.compress_size)}-fold; at most "
                                  f"{MAX_RATIO}-fold (a zip bomb?)")
        total += info.file_size
        if total > limits.max_bytes:
            raise ResourceExhausted(f"spec.exported.archive: the members hold more than "
                                    f"{_mib(limits.max_bytes)} uncompressed (max_exported_mb)")
        members[rel] = info
    return zf, members


def _read(zf: zipfile.ZipFile, members: Mapping[str, zipfile.ZipInfo], rel: str) -> bytes:
    info = members[rel]
    try:
        with zf.open(info) as f:
            data = f.read(info.file_size + 1)
    except (zipfile.BadZipFile, ValueError, EOFError, OSError, NotImplementedError,
            RuntimeError) as exc:
        raise InvalidArgument(f"spec.exported.archive: member {rel!r} cannot be read: {exc}"
                              ) from None
    if len(data) != info.file_size:
        raise InvalidArgument(f"spec.exported.archive: member {rel!r} does not match its "
                              "declared size")
    return data


def _json(zf: zipfile.ZipFile, members: Mapping[str, zipfile.ZipInfo], rel: str) -> Any:
    try:
        return json.loads(_read(zf, members, rel))
    except (ValueError, RecursionError) as exc:
        raise InvalidArgument(f"spec.exported.archive: member {rel!r} is not valid JSON: "
                              f"{str(exc)[:200]}") from None


# ------------------------------------------------------------------------------------ JSON shapes


class _Bad(Exception):
    """A malformed value in the graph JSON; turned into InvalidArgument with its location."""


def _dict(v: Any, what: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise _Bad(f"{what}: expected an object")
    return v


def _list(v: Any, what: str) -> list[Any]:
    if not isinstance(v, list):
        raise _Bad(f"{what}: expected a list")
    return v


def _str(v: Any, what: str) -> str:
    if not isinstance(v, str) or len(v) > MAX_NAME:
        raise _Bad(f"{what}: expected a name of at most {MAX_NAME} characters")
    return v


def _int(v: Any, what: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not -(1 << 63) <= v < (1 << 63):
        raise _Bad(f"{what}: expected a 64-bit integer")
    return v


def _float(v: Any, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _Bad(f"{what}: expected a number")
    return float(v)


def _bool(v: Any, what: str) -> bool:
    if not isinstance(v, bool):
        raise _Bad(f"{what}: expected true or false")
    return v


def _one(v: Any, what: str) -> tuple[str, Any]:
    """A serialized union: an object with exactly one key."""
    d = _dict(v, what)
    if len(d) != 1:
        raise _Bad(f"{what}: expected one of a union's members, got {sorted(d)[:4]}")
    return next(iter(d.items()))


# ------------------------------------------------------------------------------------ tensors


@dataclass(frozen=True)
class TensorMeta:
    dtype: torch.dtype
    sizes: tuple[int, ...]
    strides: tuple[int, ...]
    offset: int
    requires_grad: bool

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)

    @property
    def extent(self) -> int:
        """Elements of storage the view reaches (0 for an empty tensor)."""
        if self.numel == 0:
            return 0
        return self.offset + sum((s - 1) * st for s, st in zip(self.sizes, self.strides)) + 1


def _static_ints(v: Any, what: str) -> tuple[int, ...]:
    out = []
    for i, item in enumerate(_list(v, what)):
        kind, value = _one(item, f"{what}[{i}]")
        if kind != "as_int":
            raise _Bad(f"{what}[{i}]: weights must have static sizes")
        out.append(_int(value, f"{what}[{i}]"))
    return tuple(out)


def _tensor_meta(v: Any, what: str) -> TensorMeta:
    d = _dict(v, what)
    dtype = DTYPES.get(d.get("dtype"))  # type: ignore[arg-type]
    if dtype is None:
        raise _Bad(f"{what}.dtype: {d.get('dtype')!r} is not a supported dtype "
                   f"({sorted(str(t).removeprefix('torch.') for t in DTYPES.values())})")
    if d.get("layout", LAYOUT_STRIDED) != LAYOUT_STRIDED:
        raise _Bad(f"{what}.layout: only dense (strided) tensors")
    sizes = _static_ints(d.get("sizes"), f"{what}.sizes")
    strides = _static_ints(d.get("strides"), f"{what}.strides")
    kind, offset = _one(d.get("storage_offset"), f"{what}.storage_offset")
    if kind != "as_int":
        raise _Bad(f"{what}.storage_offset: must be static")
    offset = _int(offset, f"{what}.storage_offset")
    if len(sizes) > MAX_DIMS or len(strides) != len(sizes):
        raise _Bad(f"{what}: at most {MAX_DIMS} dimensions, one stride each")
    if any(not 0 <= s <= MAX_DIM for s in sizes) or any(not 0 <= s <= MAX_DIM for s in strides):
        raise _Bad(f"{what}: sizes and strides must lie in 0..{MAX_DIM}")
    if not 0 <= offset <= MAX_DIM:
        raise _Bad(f"{what}.storage_offset: must lie in 0..{MAX_DIM}")
    return TensorMeta(dtype, sizes, strides, offset, _bool(d.get("requires_grad", False),
                                                           f"{what}.requires_grad"))


@dataclass(frozen=True)
class Payload:
    """One entry of a weights or constants table: which member holds it, and its layout."""

    member: str
    meta: TensorMeta
    is_param: bool


def _payloads(table: Any, directory: str, prefix: str, members: Mapping[str, zipfile.ZipInfo],
              what: str) -> dict[str, Payload]:
    config = _dict(_dict(table, what).get("config"), f"{what}.config")
    out = {}
    for fqn, entry in config.items():
        where = f"{what}[{fqn!r}]"
        entry = _dict(entry, where)
        path = _str(entry.get("path_name"), f"{where}.path_name")
        if entry.get("use_pickle") is not False:
            raise _Bad(f"{where}: stored with pickle (use_pickle); only raw tensor bytes are "
                       "accepted (tensor subclasses are pickled by torch.export.save)")
        if not path.startswith(prefix) or not path[len(prefix):].isdigit():
            raise _Bad(f"{where}.path_name: {path!r} is not a {prefix}N tensor file")
        member = directory + path
        if member not in members:
            raise _Bad(f"{where}: its data {member!r} is not in the archive")
        meta = _tensor_meta(entry.get("tensor_meta"), f"{where}.tensor_meta")
        size = members[member].file_size
        item = meta.dtype.itemsize
        if size % item or size // item < meta.extent:
            raise _Bad(f"{where}: {member!r} holds {size} bytes, too few for "
                       f"{list(meta.sizes)} {str(meta.dtype).removeprefix('torch.')}")
        out[_str(fqn, where)] = Payload(member, meta, _bool(entry.get("is_param", False),
                                                            f"{where}.is_param"))
    return out


# ------------------------------------------------------------------------------------ graph check

# Values a node produces: a tensor with the sources it may alias, a symbolic int/bool/float.
INPUT, PARAM = "input", "parameter"


@dataclass
class _Node:
    target: str
    fn: Any
    args: list[Any]
    kwargs: dict[str, Any]
    outputs: list[Any]          # per return: None, a name, or a list of names (Tensor[])
    fresh: bool                 # allocates new memory (counts toward the meta budget)
    writes: frozenset[str] = frozenset()  # values it updates in place


@dataclass
class ProgramPlan:
    """One checked program: how to feed it, its nodes, and what it returns."""

    name: str
    lifted: list[tuple[str, str]]    # per graph input: (parameter|buffer|constant|input, fqn)
    placeholders: list[str]
    nodes: list[_Node]
    user_outputs: list[str]
    mutations: list[tuple[str, str]]  # (graph value, buffer fqn) copied back after a call
    input_names: list[str]
    output_names: list[str]
    signature: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class _Ref:
    name: str


@dataclass(frozen=True)
class _Device:
    pass


class _GraphChecker:
    """Walks one serialized graph in order; every reference must name an earlier value."""

    def __init__(self, ops: Mapping[str, Any], what: str) -> None:
        self.ops = ops
        self.what = what
        self.tensors: dict[str, frozenset[str]] = {}  # name -> sources it may alias
        self.syms: set[str] = set()

    def define_tensor(self, name: str, sources: frozenset[str], what: str) -> None:
        if name in self.tensors or name in self.syms:
            raise _Bad(f"{what}: the value {name!r} is defined twice")
        self.tensors[name] = sources

    def define_sym(self, name: str, what: str) -> None:
        if name in self.tensors or name in self.syms:
            raise _Bad(f"{what}: the value {name!r} is defined twice")
        self.syms.add(name)

    def tensor(self, v: Any, what: str) -> _Ref:
        name = _str(_dict(v, what).get("name"), f"{what}.name")
        if name not in self.tensors:
            raise _Bad(f"{what}: {name!r} is not a tensor defined earlier")
        return _Ref(name)

    def sym(self, v: Any, kind: str, what: str) -> Any:
        k, value = _one(v, what)
        if k == "as_name":
            name = _str(value, what)
            if name not in self.syms:
                raise _Bad(f"{what}: {name!r} is not a symbolic value defined earlier")
            return _Ref(name)
        if k == f"as_{kind}":
            return {"int": _int, "float": _float, "bool": _bool}[kind](value, what)
        raise _Bad(f"{what}: unexpected {k!r}")

    def argument(self, v: Any, what: str) -> Any:
        kind, value = _one(v, what)
        if kind == "as_none":
            return None
        if kind == "as_tensor":
            return self.tensor(value, what)
        if kind == "as_tensors":
            return [self.tensor(t, f"{what}[{i}]") for i, t in enumerate(_list(value, what))]
        if kind == "as_optional_tensors":
            out = []
            for i, item in enumerate(_list(value, what)):
                k, t = _one(item, f"{what}[{i}]")
                out.append(None if k == "as_none" else self.tensor(t, f"{what}[{i}]")
                           if k == "as_tensor" else _fail(f"{what}[{i}]: unexpected {k!r}"))
            return out
        if kind == "as_int":
            return _int(value, what)
        if kind == "as_ints":
            return [_int(x, what) for x in _list(value, what)]
        if kind == "as_float":
            return _float(value, what)
        if kind == "as_floats":
            return [_float(x, what) for x in _list(value, what)]
        if kind == "as_bool":
            return _bool(value, what)
        if kind == "as_bools":
            return [_bool(x, what) for x in _list(value, what)]
        if kind == "as_string":
            return _str(value, what)
        if kind == "as_strings":
            return [_str(x, what) for x in _list(value, what)]
        if kind in ("as_sym_int", "as_sym_float", "as_sym_bool"):
            return self.sym(value, kind.removeprefix("as_sym_"), what)
        if kind == "as_sym_ints":
            return [self.sym(x, "int", f"{what}[{i}]") for i, x in enumerate(_list(value, what))]
        if kind == "as_scalar_type":
            dtype = DTYPES.get(value)
            if dtype is None:
                raise _Bad(f"{what}: dtype {value!r} is not supported")
            return dtype
        if kind == "as_memory_format":
            fmt = MEMORY_FORMATS.get(value)
            if fmt is None:
                raise _Bad(f"{what}: memory format {value!r} is not supported")
            return fmt
        if kind == "as_layout":
            if value != LAYOUT_STRIDED:
                raise _Bad(f"{what}: only the strided layout")
            return torch.strided
        if kind == "as_device":
            dev = _str(_dict(value, what).get("type"), f"{what}.type")
            if dev not in ("cpu", "cuda"):
                raise _Bad(f"{what}: device {dev!r} is not supported")
            return _Device()  # the model's own device, chosen when the graph is built
        raise _Bad(f"{what}: {kind!r} arguments (subgraphs, operators, custom objects, ...) "
                   "are not accepted")

    def sources(self, value: Any) -> frozenset[str]:
        if isinstance(value, _Ref):
            return self.tensors.get(value.name, frozenset())
        if isinstance(value, list):
            return frozenset().union(*(self.sources(v) for v in value))
        return frozenset()

    def node(self, index: int, raw: Any) -> _Node:
        raw = _dict(raw, f"node {index}")
        target = _str(raw.get("target"), f"node {index}.target")
        label = f"{self.what}: graph node {index} ({str(raw.get('name', ''))[:64]})"
        fn = self.ops.get(target)
        if fn is None:
            why = ("custom operators are not accepted" if not target.startswith(ATEN_PREFIX)
                   and target not in PY_OPS else "it is not in the operator allow-list "
                   "(docs/exported.md; a server operator may add ATen operators with "
                   "--exported-ops)")
            raise InvalidArgument(f"{label}: operator {target[:128]!r} is refused: {why}")
        try:
            return self._node(target, fn, raw)
        except _Bad as exc:
            raise InvalidArgument(f"{label}, {target}: {exc}") from None

    def _node(self, target: str, fn: Any, raw: dict[str, Any]) -> _Node:
        inputs = _list(raw.get("inputs"), "inputs")
        python = target in PY_OPS
        schema = None if python else fn._schema
        names = [] if schema is None else [a.name for a in schema.arguments]
        args: list[Any] = []
        kwargs: dict[str, Any] = {}
        values: dict[str, Any] = {}
        for i, item in enumerate(inputs):
            item = _dict(item, f"inputs[{i}]")
            name = _str(item.get("name"), f"inputs[{i}].name")
            value = self.argument(item.get("arg"), f"argument {name!r}")
            if python:
                if not all(isinstance(v, (int, _Ref)) and not isinstance(v, bool)
                           and (not isinstance(v, _Ref) or v.name in self.syms)
                           for v in [value]):
                    raise _Bad(f"argument {name!r}: size arithmetic takes integers only")
                args.append(value)
                continue
            if name not in names:
                raise _Bad(f"argument {name!r} is not in the schema ({', '.join(names)})")
            if name in values:
                raise _Bad(f"argument {name!r} is given twice")
            values[name] = value
            if item.get("kind", 1) == 1 and not kwargs and names.index(name) == len(args):
                args.append(value)
            else:
                kwargs[name] = value
            if name in WINDOW_ARGS:
                for v in value if isinstance(value, list) else [value]:
                    if isinstance(v, int) and abs(v) > MAX_WINDOW:
                        raise _Bad(f"argument {name!r}={value!r} is out of range; window "
                                   f"arguments are at most {MAX_WINDOW}")
        for name, (bad, why) in REFUSED_ARGS.get(target, {}).items():
            if values.get(name) is bad:
                raise _Bad(f"argument {name!r}={bad!r} is refused: {why}")
        fresh = True
        writes: set[str] = set()
        returns_alias: list[frozenset[str]] = []
        if schema is not None:
            written = set(HIDDEN_WRITES.get(target, ()))
            sets: dict[str, set[str]] = {}
            for a in schema.arguments:
                if a.alias_info is not None:
                    sets[a.name] = set(a.alias_info.before_set)
                    if a.alias_info.is_write:
                        written.add(a.name)
            for name in written & values.keys():
                refs = values[name] if isinstance(values[name], list) else [values[name]]
                writes.update(r.name for r in refs if isinstance(r, _Ref))
                bad = self.sources(values[name]) & {INPUT, PARAM}
                if bad:
                    raise _Bad(f"writes in place into argument {name!r}, which may be (a view "
                               f"of) a model {min(bad)}; in-place updates may only touch "
                               "buffers or tensors the graph made")
            for r in schema.returns:
                if r.alias_info is None:
                    returns_alias.append(frozenset())
                    continue
                fresh = False
                letters = set(r.alias_info.before_set)
                returns_alias.append(frozenset().union(*(
                    self.sources(values[n]) for n, s in sets.items()
                    if s & letters and n in values)))
        outputs: list[Any] = []
        for j, out in enumerate(_list(raw.get("outputs"), "outputs")):
            kind, value = _one(out, f"outputs[{j}]")
            alias = returns_alias[j] if j < len(returns_alias) else frozenset()
            if kind == "as_none":
                outputs.append(None)
            elif kind == "as_tensor":
                name = _str(_dict(value, "output").get("name"), "output name")
                self.define_tensor(name, alias, f"outputs[{j}]")
                outputs.append(name)
            elif kind == "as_tensors":
                names_j = []
                for k, t in enumerate(_list(value, f"outputs[{j}]")):
                    name = _str(_dict(t, "output").get("name"), "output name")
                    self.define_tensor(name, alias, f"outputs[{j}][{k}]")
                    names_j.append(name)
                outputs.append(names_j)
            elif kind in ("as_sym_int", "as_sym_float", "as_sym_bool"):
                key, sym = _one(value, f"outputs[{j}]")
                if key != "as_name":
                    raise _Bad(f"outputs[{j}]: expected a name")
                self.define_sym(_str(sym, "output name"), f"outputs[{j}]")
                outputs.append(sym)
            else:
                raise _Bad(f"outputs[{j}]: {kind!r} results are not accepted")
        if python and (len(outputs) != 1 or outputs[0] not in self.syms):
            raise _Bad("size arithmetic must return one symbolic integer")
        if schema is not None and len(outputs) != len(schema.returns):
            raise _Bad(f"{len(outputs)} results for a schema with {len(schema.returns)}")
        return _Node(target, fn, args, kwargs, outputs, fresh and not python,
                     frozenset(writes))


def _fail(msg: str) -> Any:
    raise _Bad(msg)


def _output_names(module_call_graph: Any, count: int) -> list[str]:
    """Names of the flattened outputs: a returned dict's keys, else their indices."""
    names = [str(i) for i in range(count)]
    try:
        sig = module_call_graph[0]["signature"]
        spec = json.loads(sig["out_spec"])[1]
        if (spec.get("type") == "builtins.dict"
                and all(c.get("type") is None for c in spec["children_spec"])):
            keys = json.loads(spec["context"])
            if (len(keys) == count and all(isinstance(k, str) and 0 < len(k) <= 64 for k in keys)
                    and len(set(keys)) == count):
                names = keys
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, RecursionError):
        pass
    return names


def _input_names(module_call_graph: Any, count: int) -> list[str]:
    try:
        names = module_call_graph[0]["signature"]["forward_arg_names"]
        if (isinstance(names, list) and len(names) == count
                and all(isinstance(n, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", n)
                        for n in names)):
            return list(names)
    except (KeyError, IndexError, TypeError):
        pass
    return [f"input{i}" for i in range(count)]


def _check_program(name: str, doc: Any, weights: dict[str, Payload],
                   constants: dict[str, Payload], limits: ArchiveLimits,
                   ops: Mapping[str, Any]) -> ProgramPlan:
    what = f"spec.exported.archive: program {name!r}"
    try:
        doc = _dict(doc, "models json")
        version = _dict(doc.get("schema_version"), "schema_version").get("major")
        if version != SCHEMA_MAJOR:
            raise InvalidArgument(f"{what}: serialization schema {version!r}; this server reads "
                                  f"schema {SCHEMA_MAJOR} (torch {torch.__version__}): export "
                                  "with a matching torch")
        gm = _dict(doc.get("graph_module"), "graph_module")
        graph = _dict(gm.get("graph"), "graph")
        sig = _dict(gm.get("signature"), "signature")
        nodes = _list(graph.get("nodes"), "graph.nodes")
        if len(nodes) > limits.max_nodes:
            raise ResourceExhausted(f"{what}: {len(nodes)} graph nodes; the limit "
                                    f"(max_exported_nodes) is {limits.max_nodes}")
        checker = _GraphChecker(ops, what)
        lifted: list[tuple[str, str]] = []
        placeholders: list[str] = []
        in_specs = _list(sig.get("input_specs"), "signature.input_specs")
        graph_inputs = _list(graph.get("inputs"), "graph.inputs")
        if len(in_specs) != len(graph_inputs):
            raise _Bad("signature.input_specs and graph.inputs differ in length")
        used: set[tuple[str, str]] = set()
        user = 0
        for i, (spec, arg) in enumerate(zip(in_specs, graph_inputs)):
            kind, body = _one(spec, f"input_specs[{i}]")
            body = _dict(body, f"input_specs[{i}]")
            if kind == "user_input":
                k, t = _one(body.get("arg"), f"input_specs[{i}].arg")
                if k != "as_tensor":
                    raise _Bad(f"input_specs[{i}]: forward takes a {k!r}; every input of an "
                               "uploaded module must be a tensor")
                entry = ("input", str(user))
                user += 1
                sources = frozenset({INPUT})
                arg_name = _str(_dict(t, "arg").get("name"), "arg name")
            elif kind in ("parameter", "buffer", "tensor_constant"):
                key = {"parameter": "parameter_name", "buffer": "buffer_name",
                       "tensor_constant": "tensor_constant_name"}[kind]
                fqn = _str(body.get(key), f"input_specs[{i}].{key}")
                persistent = kind == "buffer" and body.get("persistent", True) is not False
                table = weights if kind == "parameter" or persistent else constants
                if fqn not in table:
                    raise _Bad(f"input_specs[{i}]: {kind} {fqn!r} has no data in the "
                               f"{'weights' if table is weights else 'constants'} table")
                if (kind == "parameter") != table[fqn].is_param and table is weights:
                    raise _Bad(f"input_specs[{i}]: {fqn!r} is a {kind} here but not in the "
                               "weights table")
                used.add(("w" if table is weights else "c", fqn))
                entry = ({"parameter": "parameter", "buffer": "buffer" if persistent
                          else "constant", "tensor_constant": "constant"}[kind], fqn)
                sources = frozenset({PARAM}) if kind == "parameter" else frozenset()
                arg_name = _str(_dict(body.get("arg"), "arg").get("name"), "arg name")
            else:
                raise _Bad(f"input_specs[{i}]: {kind!r} inputs (custom objects, tokens, "
                           "non-tensor constants) are not accepted")
            k, t = _one(arg, f"graph.inputs[{i}]")
            if k != "as_tensor" or _dict(t, "input").get("name") != arg_name:
                raise _Bad(f"graph.inputs[{i}] does not match input_specs[{i}]")
            checker.define_tensor(arg_name, sources, f"graph.inputs[{i}]")
            placeholders.append(arg_name)
            lifted.append(entry)
        extra = ({("w", k) for k in weights} | {("c", k) for k in constants}) - used
        if extra:
            raise _Bad(f"the weight tables hold {sorted(n for _, n in extra)[:3]}, which no "
                       "input of the graph uses")
        if user == 0:
            raise _Bad("the program takes no tensor input")
    except _Bad as exc:
        raise InvalidArgument(f"{what}: {exc}") from None
    plans = [checker.node(i, n) for i, n in enumerate(nodes)]
    try:
        out_specs = _list(sig.get("output_specs"), "signature.output_specs")
        graph_outputs = _list(graph.get("outputs"), "graph.outputs")
        if len(out_specs) != len(graph_outputs):
            raise _Bad("signature.output_specs and graph.outputs differ in length")
        user_outputs: list[str] = []
        mutations: list[tuple[str, str]] = []
        buffers = {fqn for kind, fqn in lifted if kind == "buffer"}
        for i, (spec, arg) in enumerate(zip(out_specs, graph_outputs)):
            kind, body = _one(spec, f"output_specs[{i}]")
            k, t = _one(arg, f"graph.outputs[{i}]")
            if k != "as_tensor":
                raise _Bad(f"graph.outputs[{i}]: the module returns a {k!r}; every output "
                           "must be a tensor")
            ref = checker.tensor(t, f"graph.outputs[{i}]").name
            if kind == "user_output":
                user_outputs.append(ref)
            elif kind == "buffer_mutation":
                fqn = _str(_dict(body, "buffer_mutation").get("buffer_name"), "buffer_name")
                if fqn not in buffers:
                    raise _Bad(f"output_specs[{i}]: {fqn!r} is not a buffer of the program")
                mutations.append((ref, fqn))
            else:
                raise _Bad(f"output_specs[{i}]: {kind!r} outputs (input mutations, tokens, "
                           "gradients) are not accepted")
        if not user_outputs:
            raise _Bad("the program returns no tensor")
        calls = gm.get("module_call_graph")
        return ProgramPlan(name, lifted, placeholders, plans, user_outputs, mutations,
                           _input_names(calls, user), _output_names(calls, len(user_outputs)),
                           [(k, f) for k, f in lifted if k != "input"])
    except _Bad as exc:
        raise InvalidArgument(f"{what}: {exc}") from None


# ------------------------------------------------------------------------------------ archive


@dataclass
class CheckedArchive:
    """An archive whose every member, table and graph node passed the checks."""

    zf: zipfile.ZipFile
    members: dict[str, zipfile.ZipInfo]
    programs: dict[str, ProgramPlan]
    weights: dict[str, Payload]
    constants: dict[str, Payload]

    @property
    def num_elements(self) -> int:
        return sum(p.meta.numel for p in (*self.weights.values(), *self.constants.values()))

    @property
    def input_names(self) -> list[str]:
        return self.programs["model"].input_names

    @property
    def output_names(self) -> list[str]:
        return self.programs["model"].output_names


def check_archive(data: bytes, limits: ArchiveLimits) -> CheckedArchive:
    """Every check, in order: zip directory, member list, tables, graph; no weight is read."""
    zf, members = _open_zip(data, limits)
    for rel, want in (("archive_format", b"pt2"), ("archive_version", ARCHIVE_VERSION),
                      ("byteorder", b"little")):
        if rel not in members:
            if rel == "byteorder":
                continue
            raise InvalidArgument(f"spec.exported.archive: no {rel!r} member; this is not a "
                                  "torch.export archive (torch.export.save writes one)")
        got = _read(zf, members, rel).strip()
        if got != want:
            raise InvalidArgument(f"spec.exported.archive: {rel} is {got[:16]!r}; this server "
                                  f"reads {want!r}")
    present = [p for p in PROGRAMS if f"models/{p}.json" in members]
    if "model" not in present:
        raise InvalidArgument("spec.exported.archive: no program 'model' (models/model.json)")
    ops = allowed_ops(tuple(limits.extra_ops))
    programs: dict[str, ProgramPlan] = {}
    tables: dict[str, tuple[dict[str, Payload], dict[str, Payload]]] = {}
    for name in present:
        try:
            tabs = []
            for kind, directory, prefix in (("weights", "data/weights/", "weight_"),
                                             ("constants", "data/constants/", "tensor_")):
                rel = f"{directory}{name}_{kind}_config.json"
                if rel not in members:
                    raise _Bad(f"no {kind} table {rel!r}")
                tabs.append(_payloads(_json(zf, members, rel), directory, prefix, members, rel))
        except _Bad as exc:
            raise InvalidArgument(f"spec.exported.archive: program {name!r}: {exc}") from None
        tables[name] = (tabs[0], tabs[1])
        programs[name] = _check_program(name, _json(zf, members, f"models/{name}.json"),
                                        tabs[0], tabs[1], limits, ops)
    weights, constants = tables["model"]
    count = sum(p.meta.numel for p in (*weights.values(), *constants.values()))
    if count > limits.max_parameters:
        raise ResourceExhausted(f"spec.exported.archive: {count} parameter, buffer and constant "
                                f"elements; the limit (max_parameters) is {limits.max_parameters}")
    if "eval" in programs:
        _check_same(programs["model"], programs["eval"], tables["model"], tables["eval"])
    return CheckedArchive(zf, members, programs, weights, constants)


def _check_same(train: ProgramPlan, ev: ProgramPlan,
                a: tuple[dict[str, Payload], dict[str, Payload]],
                b: tuple[dict[str, Payload], dict[str, Payload]]) -> None:
    """The eval program must run on the model program's state: same names, shapes, inputs."""
    what = "spec.exported.archive: program 'eval'"
    if sorted(train.signature) != sorted(ev.signature):
        raise InvalidArgument(f"{what} has other parameters, buffers or constants than 'model'")
    for mine, theirs in zip(a, b):
        for fqn, p in mine.items():
            q = theirs.get(fqn)
            if q is None or (q.meta.dtype, q.meta.sizes) != (p.meta.dtype, p.meta.sizes):
                raise InvalidArgument(f"{what}: {fqn!r} differs from the model program's")
    if len(train.input_names) != len(ev.input_names):
        raise InvalidArgument(f"{what} takes {len(ev.input_names)} inputs; 'model' takes "
                              f"{len(train.input_names)}")
    if len(train.user_outputs) != len(ev.user_outputs):
        raise InvalidArgument(f"{what} returns {len(ev.user_outputs)} outputs; 'model' returns "
                              f"{len(train.user_outputs)}")


# ------------------------------------------------------------------------------------ building


def _tensor(data: bytes, meta: TensorMeta) -> torch.Tensor:
    """Raw little-endian bytes -> a compact tensor (a copy the model owns)."""
    if meta.numel == 0:
        return torch.empty(meta.sizes, dtype=meta.dtype)
    storage = torch.frombuffer(bytearray(data), dtype=meta.dtype)
    return torch.as_strided(storage, meta.sizes, meta.strides, meta.offset).clone()


@dataclass
class CompiledProgram:
    module: fx.GraphModule
    fresh: frozenset[str]          # fx node names whose results are new allocations
    lifted: list[tuple[str, str]]
    outputs: int                   # user outputs first, then buffer mutations
    mutations: list[str]           # buffer fqns, in output order after the user outputs


def _compile(plan: ProgramPlan, device: torch.device) -> CompiledProgram:
    module, fresh = _graph(plan, device)
    return CompiledProgram(module, fresh, plan.lifted, len(plan.user_outputs),
                           [fqn for _, fqn in plan.mutations])


def _graph(plan: ProgramPlan, device: torch.device) -> tuple[fx.GraphModule, frozenset[str]]:
    graph = fx.Graph()
    env: dict[str, Any] = {}
    for i, name in enumerate(plan.placeholders):
        env[name] = graph.placeholder(f"arg{i}")

    def value(v: Any) -> Any:
        if isinstance(v, _Ref):
            return env[v.name]
        if isinstance(v, list):
            return [value(x) for x in v]
        if isinstance(v, _Device):
            return device
        return v

    fresh: set[str] = set()
    written = frozenset().union(*(node.writes for node in plan.nodes))
    for node in plan.nodes:
        if node.target in SKIPPED:
            continue
        fn = node.fn
        if node.target == _VIEW and not set(node.outputs) & written:
            # view() assumes the strides the export device's kernels produced (CUDA attention
            # lays out its result differently from CPU's); reshape is the same values and
            # gradients, a view where one is possible. Kept where an in-place update needs the
            # alias.
            fn = torch.ops.aten.reshape.default
        call = graph.call_function(fn, tuple(value(a) for a in node.args),
                                   {k: value(v) for k, v in node.kwargs.items()})
        if node.fresh:
            fresh.add(call.name)
        if len(node.outputs) == 1 and not isinstance(node.outputs[0], list):
            if node.outputs[0] is not None:
                env[node.outputs[0]] = call
            continue
        for j, out in enumerate(node.outputs):
            item = call if len(node.outputs) == 1 else graph.call_function(
                operator.getitem, (call, j))
            if isinstance(out, list):
                for k, name in enumerate(out):
                    env[name] = graph.call_function(operator.getitem, (item, k))
            elif out is not None:
                env[out] = item
    graph.output(tuple(env[n] for n in (*plan.user_outputs, *(v for v, _ in plan.mutations))))
    graph.lint()
    return fx.GraphModule(nn.Module(), graph, class_name="ExportedGraph"), frozenset(fresh)


class _Budget(fx.Interpreter):
    """Runs a graph on fake tensors, adding up the bytes its operators would allocate."""

    def __init__(self, program: CompiledProgram, limit: int) -> None:
        super().__init__(program.module)
        self.fresh = program.fresh
        self.limit = limit
        self.total = 0

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if n.name in self.fresh:
            for t in result if isinstance(result, (tuple, list)) else (result,):
                if isinstance(t, torch.Tensor):
                    self.total += t.numel() * t.element_size()
            if self.total > self.limit:
                raise ResourceExhausted(
                    f"inputs: the exported graph would allocate more than {_mib(self.limit)} "
                    f"(max_graph_mb) for these input shapes (at {n.target}); send smaller "
                    "batches")
        return result


class ExportedModule(nn.Module):
    """A checked exported program as an nn.Module: state_dict names are the original module's.

    forward(*inputs) returns a tuple of every output (in ModelInfo.outputs order). Parameters,
    buffers and constants are ordinary module state (constants and non-persistent buffers as
    non-persistent buffers), so .to(), state_dict(), the optimizer and
    torch.func.functional_call (e.g. with meta tensors) work as with any module.
    """

    def __init__(self, archive: CheckedArchive, device: torch.device | str = "cpu") -> None:
        super().__init__()
        device = torch.device(device)
        self.input_names = archive.input_names
        self.output_names = archive.output_names
        cache: dict[tuple[str, TensorMeta], torch.Tensor] = {}
        raw: dict[str, bytes] = {}

        def load(p: Payload) -> torch.Tensor:
            key = (p.member, p.meta)
            if key not in cache:  # tied weights (one storage, one layout) stay one tensor
                if p.member not in raw:
                    raw[p.member] = _read(archive.zf, archive.members, p.member)
                cache[key] = _tensor(raw[p.member], p.meta)
            return cache[key]

        # fqn -> (owning submodule, "_parameters" or "_buffers", attribute): read on every call,
        # so .to() (which replaces buffers) and functional_call (which swaps both) are seen.
        self._slots: dict[str, tuple[nn.Module, str, str]] = {}
        params: dict[tuple[str, TensorMeta], nn.Parameter] = {}
        for kind, fqn in archive.programs["model"].lifted:
            if kind == "parameter":
                p = archive.weights[fqn]
                key = (p.member, p.meta)
                if key not in params:
                    params[key] = nn.Parameter(load(p), requires_grad=p.meta.requires_grad)
                self._place(fqn, params[key], kind)
            elif kind == "buffer":
                self._place(fqn, load(archive.weights[fqn]), kind)
            elif kind == "constant":
                table = archive.weights if fqn in archive.weights else archive.constants
                self._place(fqn, load(table[fqn]), kind)
        archive.zf.close()
        train = _compile(archive.programs["model"], device)
        ev = _compile(archive.programs["eval"], device) if "eval" in archive.programs else train
        # Not submodules: the graphs hold no state, and state_dict names must stay the module's.
        self._programs: dict[bool, CompiledProgram] = {True: train, False: ev}
        self._checked: dict[Any, bool] = {}

    def _place(self, fqn: str, tensor: torch.Tensor, kind: str) -> None:
        parts = fqn.split(".")
        if len(parts) > 32 or not all(_IDENT.fullmatch(p) for p in parts):
            raise InvalidArgument(f"spec.exported.archive: state name {fqn[:128]!r} is not a "
                                  "module path")
        owner: nn.Module = self
        for part in parts[:-1]:
            child = owner._modules.get(part)
            if child is None:
                if hasattr(owner, part):
                    raise InvalidArgument(f"spec.exported.archive: state name {fqn!r} clashes "
                                          "with a module attribute")
                child = nn.Module()
                owner.add_module(part, child)
            owner = child
        leaf = parts[-1]
        if hasattr(owner, leaf):
            raise InvalidArgument(f"spec.exported.archive: state name {fqn!r} is given twice "
                                  "or clashes with a module attribute")
        try:
            if kind == "parameter":
                owner.register_parameter(leaf, tensor)  # type: ignore[arg-type]
            else:
                owner.register_buffer(leaf, tensor, persistent=kind == "buffer")
        except (KeyError, TypeError, AttributeError) as exc:
            raise InvalidArgument(f"spec.exported.archive: state name {fqn!r}: {exc}") from None
        self._slots[fqn] = (owner, "_parameters" if kind == "parameter" else "_buffers", leaf)

    @property
    def num_outputs(self) -> int:
        return len(self.output_names)

    def _value(self, fqn: str) -> torch.Tensor:
        owner, table, leaf = self._slots[fqn]
        return getattr(owner, table)[leaf]  # type: ignore[no-any-return]

    def _args(self, program: CompiledProgram, inputs: Sequence[torch.Tensor],
              state: Callable[[str], torch.Tensor]) -> list[torch.Tensor]:
        if len(inputs) != len(self.input_names):
            raise InvalidArgument(f"inputs: the model takes {len(self.input_names)} input(s) "
                                  f"({', '.join(self.input_names)}), got {len(inputs)}")
        return [inputs[int(fqn)] if kind == "input" else state(fqn)
                for kind, fqn in program.lifted]

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        program = self._programs[self.training]
        out = program.module(*self._args(program, inputs, self._value))
        if program.mutations:
            with torch.no_grad():
                for fqn, value in zip(program.mutations, out[program.outputs:]):
                    self._value(fqn).copy_(value)
        return tuple(out[:program.outputs])

    def check_memory(self, inputs: Sequence[torch.Tensor], limit: int) -> None:
        """Run the graph on fake tensors first; ResourceExhausted if it would allocate > limit.

        Fake tensors (torch's FakeTensorMode, what torch.export traces with) carry shape,
        dtype, strides and device without memory, and pick the same kernels as the real device:
        plain meta tensors can disagree on strides (CUDA attention) and fail a later view.
        Cached per (mode, input shapes and dtypes): a training loop pays once per batch shape.
        """
        key = (self.training, limit, tuple((tuple(x.shape), x.dtype) for x in inputs))
        if key in self._checked:
            return
        program = self._programs[self.training]
        mode = FakeTensorMode()
        fake = {k: mode.from_tensor(self._value(k)) for k in self._slots}
        xs = [mode.from_tensor(x) for x in inputs]
        try:
            with mode, torch.no_grad():
                _Budget(program, limit).run(*self._args(program, xs, fake.__getitem__))
        except (RuntimeError, NotImplementedError, ValueError, TypeError, IndexError) as exc:
            # Refused rather than run unchecked: whatever fails on fake tensors (shape errors,
            # data-dependent output sizes) could otherwise hide an allocation after it.
            raise InvalidArgument(f"inputs: the forward pass failed (checked on fake tensors "
                                  f"before running): {str(exc)[:500]}") from None
        if len(self._checked) > 256:
            self._checked.clear()
        self._checked[key] = True


_IDENT = re.compile(r"[A-Za-z0-9_]{1,128}")


def build_exported(data: bytes, limits: ArchiveLimits, device: torch.device | str = "cpu"
                   ) -> ExportedModule:
    """Check the archive, then read its weights and compile its graphs."""
    return ExportedModule(check_archive(data, limits), device)


def output_index(names: Sequence[str], index: int, name: str) -> int:
    """Which output the loss applies to: by name (a dict key or an index), or by index."""
    if name:
        if name not in names:
            raise InvalidArgument(f"spec.exported.output_name: {name!r} is not an output; "
                                  f"outputs: {list(names)}")
        return list(names).index(name)
    if not 0 <= index < len(names):
        raise InvalidArgument(f"spec.exported.output_index: {index} is out of range; the "
                              f"module has {len(names)} output(s): {list(names)}")
    return index
