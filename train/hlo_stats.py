"""What a compiled program does per step, read from its optimized HLO text: matmul FLOPs, HBM bytes and
collective bytes, with every loop body counted as often as it runs.

XLA's own `cost_analysis()` counts the body of a `while` loop once, so for a train step with scanned layers
and micro-batches it undercounts by L × micro-batches. Here each computation gets a multiplicity (how often
it runs per step: a while body runs its trip count times, read from the `i < N` compare of its condition),
and:

- FLOPs: 2 · output elements · contraction size of every `dot` and `convolution` (TPU compiles matmuls as
  convolutions), fused or not. Custom calls (a Pallas/Mosaic kernel such as splash attention) are opaque
  and not counted.
- HBM bytes: operands read + output written by every instruction outside fused computations (what a fusion
  reads and writes is what crosses HBM) — a roofline estimate, not a measurement.
- collective bytes per chip: all-gather / all-to-all / collective-permute output, reduce-scatter input,
  2 × all-reduce size (a ring moves each byte about twice).
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "s4": 0.5, "u4": 0.5}
_ARRAY = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([0-9,]*)\]")
_HEADER = re.compile(r"^(?:ENTRY )?%(\S+) \((.*)\) -> .* \{$")
_INSTR = re.compile(r"^(?:ROOT )?%(\S+) = (.+?) ([a-z][a-z0-9-]*)\((.*)$")
_CALLED = re.compile(r"\b(calls|body|condition|to_apply|branch_computations)=\{?([^,}]+(?:, *%[^,}]+)*)\}?")
_NO_TRAFFIC = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "conditional", "call",
               "after-all", "partition-id", "replica-id", "copy-done", "all-gather-done", "all-reduce-done",
               "collective-permute-done", "async-done", "iota"}
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")


@dataclasses.dataclass
class HloStats:
    flops: float = 0.0  # matmul FLOPs per step per chip (dots and convolutions; custom calls excluded)
    hbm_bytes: float = 0.0  # bytes read + written by unfused instructions per step per chip (estimate)
    collective_bytes: dict[str, float] = dataclasses.field(default_factory=dict)  # op kind -> bytes per chip
    custom_calls: dict[str, int] = dataclasses.field(default_factory=dict)  # target -> count in the program
    # Mosaic (Pallas TPU) kernel calls by kernel name (the instruction's name without its .N suffix: "gmm",
    # "tgmm" for megablox's grouped matmuls, "splash_mha_..." for splash attention) -> count in the program
    kernels: dict[str, int] = dataclasses.field(default_factory=dict)
    loops: list[int] = dataclasses.field(default_factory=list)  # trip counts of the while loops found

    @property
    def total_collective_bytes(self) -> float:
        return sum(self.collective_bytes.values())


def _arrays(text: str) -> list[tuple[str, list[int]]]:
    return [(dt, [int(d) for d in dims.split(",") if d]) for dt, dims in _ARRAY.findall(text)]


def _nbytes(arrays: list[tuple[str, list[int]]]) -> float:
    return sum(_DTYPE_BYTES[dt] * math.prod(dims) for dt, dims in arrays)


def parse(text: str) -> HloStats:
    """Statistics of an optimized HLO module (`compiled.as_text()`)."""
    comps: dict[str, list[tuple[str, str, str, str]]] = {}  # computation -> [(name, type, opcode, args)]
    shapes: dict[str, str] = {}  # instruction / parameter name -> its type text
    roots: dict[str, str] = {}  # computation -> its ROOT instruction
    entry, current = None, None
    for raw in text.splitlines():
        line = raw.strip()
        m = _HEADER.match(line)
        if m:
            current = m.group(1)
            comps[current] = []
            if line.startswith("ENTRY"):
                entry = current
            for pname, ptype in re.findall(r"([\w.\-]+): ((?:\([^)]*\))|[^,]+)", m.group(2)):
                shapes[pname] = ptype
            continue
        if current is None or line == "}":
            continue
        m = _INSTR.match(line)
        if m:
            name, rtype, op, args = m.groups()
            shapes[name] = rtype
            comps[current].append((name, rtype, op, args))
            if line.startswith("ROOT "):
                roots[current] = name

    fused: set[str] = set()
    calls: dict[str, list[tuple[str, int]]] = {c: [] for c in comps}  # caller -> [(callee, times)]
    stats = HloStats()
    for comp, instrs in comps.items():
        for name, rtype, op, args in instrs:
            if op == "custom-call":
                t = re.search(r'custom_call_target="([^"]+)"', args)
                if t:
                    stats.custom_calls[t.group(1)] = stats.custom_calls.get(t.group(1), 0) + 1
                    if t.group(1) == "tpu_custom_call":
                        kernel = re.sub(r"\.\d+$", "", name)
                        stats.kernels[kernel] = stats.kernels.get(kernel, 0) + 1
            for kind, targets in _CALLED.findall(args):
                for callee in re.findall(r"%?([\w.\-]+)", targets):
                    if callee not in comps:
                        continue
                    if op == "fusion" and kind == "calls":
                        fused.add(callee)
                    times = 1
                    if op == "while" and kind == "body":
                        cond = re.search(r"condition=%?([\w.\-]+)", args)
                        times = _trip_count(comps.get(cond.group(1), []) if cond else [])
                        stats.loops.append(times)
                    calls[comp].append((callee, times))
    # Propagate how often each computation runs, from the entry down (HLO call graphs are acyclic).
    runs: dict[str, float] = {c: 0.0 for c in comps}
    if entry is None:
        return stats
    runs[entry] = 1.0
    for comp in _topological(entry, calls):
        for callee, times in calls[comp]:
            runs[callee] += runs[comp] * times
    for comp, instrs in comps.items():
        n = runs[comp]
        if not n:
            continue
        for name, rtype, op, args in instrs:
            out = _arrays(rtype)
            operands = [o for o in re.findall(r"%([\w.\-]+)", args.split(")")[0]) if o in shapes]
            if op in ("dot", "convolution"):
                stats.flops += n * _matmul_flops(op, out, args, operands, shapes)
            base = op.removesuffix("-start")
            if base in COLLECTIVES:
                size = _nbytes(out)
                if op.endswith("-start") and len(out) > 1:  # (operand, result, ...) tuple: the result
                    size = max(_nbytes([a]) for a in out)
                if base == "reduce-scatter":
                    size = sum(_nbytes(_arrays(shapes[o])) for o in operands) or size
                elif base == "all-reduce":
                    size *= 2
                stats.collective_bytes[base] = stats.collective_bytes.get(base, 0.0) + n * size
            if comp not in fused and op not in _NO_TRAFFIC and not op.endswith("-done"):
                if op == "dynamic-update-slice" and len(operands) > 1:  # in place: the update is read and written
                    stats.hbm_bytes += n * 2 * _nbytes(_arrays(shapes[operands[1]]))
                    continue
                if op == "fusion":
                    callee = re.search(r"calls=%?([\w.\-]+)", args)
                    if callee and callee.group(1) in comps:
                        stats.hbm_bytes += n * _fusion_traffic(comps[callee.group(1)], roots.get(callee.group(1)),
                                                               operands, out, shapes, comps)
                        continue
                read = sum(_nbytes(_arrays(shapes[o])) for o in operands)
                stats.hbm_bytes += n * (read + _nbytes(out))
    return stats


def _fusion_traffic(body, root, operands, out, shapes, comps=None, roots=None) -> float:
    """HBM bytes of one fusion: a parameter that the fusion only slices (a layer of a stacked weight, one
    step of a saved activation; through bitcasts and nested fusions) costs the slices, not the whole buffer;
    a fusion whose root updates a buffer in place (dynamic-update-slice) writes the update, not the buffer."""
    params = {name: int(args.split(")")[0]) for name, _, op, args in body if op == "parameter"}
    inplace, written = None, _nbytes(out)
    for name, rtype, op, args in body:
        if name == root and op == "dynamic-update-slice":
            ops = re.findall(r"%([\w.\-]+)", args.split(")")[0])
            inplace = ops[0] if ops else None
            written = _nbytes(_arrays(shapes[ops[1]])) if len(ops) > 1 and ops[1] in shapes else written
    read = 0.0
    for p, index in params.items():
        if p == inplace:
            continue
        sliced = _sliced_bytes(body, p, comps or {}, depth=0)
        if sliced is not None:
            read += sliced
        elif index < len(operands):
            read += _nbytes(_arrays(shapes[operands[index]]))
    return read + written


def _sliced_bytes(body, value: str, comps, depth: int) -> float | None:
    """Bytes read of `value` when every use of it only takes slices (dynamic-slice, possibly after bitcasts or
    inside nested fusions); None when some use reads it whole."""
    total, used = 0.0, False
    for name, rtype, op, args in body:
        ops = re.findall(r"%([\w.\-]+)", args.split(")")[0])
        if value not in ops:
            continue
        used = True
        if op == "dynamic-slice" and ops[0] == value:
            total += _nbytes(_arrays(rtype))
        elif op in ("bitcast", "reshape", "copy") and depth < 4:
            inner = _sliced_bytes(body, name, comps, depth + 1)
            if inner is None:
                return None
            total += inner
        elif op == "fusion" and depth < 4:
            callee = re.search(r"calls=%?([\w.\-]+)", args)
            nested = comps.get(callee.group(1)) if callee else None
            if nested is None:
                return None
            param = next((n for n, _, o, a in nested if o == "parameter" and int(a.split(")")[0]) == ops.index(value)),
                         None)
            inner = _sliced_bytes(nested, param, comps, depth + 1) if param else None
            if inner is None:
                return None
            total += inner
        else:
            return None
    return total if used else None


def _topological(entry: str, calls: dict[str, list[tuple[str, int]]]) -> list[str]:
    order, seen = [], set()

    def visit(c: str) -> None:
        if c in seen:
            return
        seen.add(c)
        for callee, _ in calls.get(c, []):
            visit(callee)
        order.append(c)

    visit(entry)
    return order[::-1]  # callers before callees


def _trip_count(cond: list[tuple[str, str, str, str]]) -> int:
    """N from a loop condition `i < N` (jax's scan/fori loops); 1 when it cannot be read."""
    consts = {name: int(v) for name, _, op, v in
              ((n, t, o, a.split(")")[0]) for n, t, o, a in cond) if op == "constant" and v.lstrip("-").isdigit()}
    for name, _, op, args in cond:
        if op == "compare" and "direction=LT" in args:
            for operand in re.findall(r"%([\w.\-]+)", args):
                if operand in consts:
                    return max(consts[operand], 1)
    return 1


def _matmul_flops(op: str, out, args: str, operands: list[str], shapes: dict[str, str]) -> float:
    if not out or len(operands) < 2:
        return 0.0
    out_elems = math.prod(out[0][1])
    if op == "dot":
        lhs = _arrays(shapes[operands[0]])
        m = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", args)
        if not lhs or not m:
            return 0.0
        contraction = math.prod(lhs[0][1][int(i)] for i in m.group(1).split(",") if i)
        return 2.0 * out_elems * contraction
    # A convolution: 2 · output batch · output features · input features (per group) · the (output position,
    # kernel tap) pairs that land on real input, per spatial dimension. TPU matmuls with a dimension shared by
    # both operands come as convolutions whose window slides over padding; only the taps on real input count.
    lhs, kernel = _arrays(shapes[operands[0]]), _arrays(shapes[operands[1]])
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", args)
    if not lhs or not kernel or not labels:
        return 0.0
    lhs_l, ker_l, out_l = labels.groups()
    lhs_d, ker_d, out_d = lhs[0][1], kernel[0][1], out[0][1]
    flops = 2.0 * out_d[out_l.index("b")] * out_d[out_l.index("f")] * ker_d[ker_l.index("i")]
    window = re.search(r"window=\{([^}]*)\}", args)
    attrs = dict(kv.split("=", 1) for kv in window.group(1).split()) if window else {}

    def per_dim(key, n, default):
        return [int(v) for v in attrs[key].split("x")] if key in attrs else [default] * n

    spatial = [c for c in out_l if c.isdigit()]
    n = len(spatial)
    strides, lhs_dil, rhs_dil = per_dim("stride", n, 1), per_dim("lhs_dilate", n, 1), per_dim("rhs_dilate", n, 1)
    pads = [int(p.split("_")[0]) for p in attrs["pad"].split("x")] if "pad" in attrs else [0] * n
    for j, c in enumerate(spatial):
        size_in, taps, size_out = lhs_d[lhs_l.index(c)], ker_d[ker_l.index(c)], out_d[out_l.index(c)]
        if size_out * taps > 50_000_000:  # too many pairs to enumerate: assume every tap is real
            flops *= size_out * taps
            continue
        x = np.arange(size_out)[:, None] * strides[j] + np.arange(taps)[None, :] * rhs_dil[j] - pads[j]
        valid = (x >= 0) & (x <= (size_in - 1) * lhs_dil[j]) & (x % lhs_dil[j] == 0)
        flops *= int(valid.sum())
    return flops
