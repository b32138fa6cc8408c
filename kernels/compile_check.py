"""Offline compile matrix: every GPU kernel variant the backends can launch, compiled without a GPU.

    python -m recjpq.kernels.compile_check [--arch 90 80] [--jobs 2] [--json PATH] [--sample]

The interpreter and the CUDA host emulation run the kernels' logic on CPU, but neither sees what
the compilers do with it: a construct the compiler rejects (Triton specialises an int argument
equal to 1 into a constexpr), registers spilled to local memory, byte-wide code loads. This
compiles, for each target architecture:

* every Triton kernel, for every config its autotuner keeps (``_prune``) at some batch, over
  k in {1, 2, 10, 100, 1000, 2048}, N in {1, 2, 17, 1,271,638}, with and without exclusions,
  uint8 / int16 / int32 codes, at the headline M = 8, K = 256 (decode: d/M = 8), with the
  arguments the backend passes (``recjpq.backends.triton``). Cells that Triton would compile to
  the same specialisation (same signature, constexprs, alignment attributes and options: N only
  matters through ``== 1`` and ``% 16``, and the kernels do not specialise sizes) compile once;
* every template instance of csrc/cuda/*.cu through nvcc (``-Xptxas -v``), when nvcc exists.

It prints one table (kernel, variant, registers, spilled/stack bytes, shared memory, theoretical
occupancy on an H100) and exits 1 on a compile error or on local memory in a top-k or scores
kernel. ``--sample`` compiles, per kernel, every config and KT with int32 codes (the widest
loads) and every code width and exclusion setting at k = 10: each axis value at least once,
about a third of the compiles (CI runs it under two Triton versions).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import glob
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)  # compile, never interpret (read when kernels are decorated)

import torch  # noqa: E402
import triton  # noqa: E402

KS = (1, 2, 10, 100, 1000, 2048)
NS = (1, 2, 17, 1_271_638)
BATCHES = (1, 64)
CODE_DTYPES = {"uint8": torch.uint8, "int16": torch.int16, "int32": torch.int32}
M, K, DSUB, EXCLUDED = 8, 256, 8, 50  # headline shape; 50 exclusions per query
H100_SMS = 132
# Kernels that must not touch local memory: the top-k and scores paths. The cross-entropy
# kernels report their stack but do not fail the run.
MUST_NOT_SPILL = ("topk", "scores", "decode")
CUDA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "csrc", "cuda")


@dataclasses.dataclass
class Variant:
    """One kernel specialisation and the matrix cells that launch it."""
    kernel: str
    label: str  # config and constexprs, as the table shows them
    fn: object = None  # the JITFunction (Triton) or None (CUDA)
    args: tuple = ()
    kwargs: dict = dataclasses.field(default_factory=dict)
    cells: list = dataclasses.field(default_factory=list)
    result: dict = dataclasses.field(default_factory=dict)


def _mock(dtype):
    from triton.runtime.jit import MockTensor
    return MockTensor(dtype)


def _bucket(batch: int) -> int:
    return min(triton.next_power_of_2(batch), 1024)


def _selectable(kernel, prune, **args) -> list:
    """Configs the autotuner can pick at some batch bucket for these key arguments."""
    seen = []
    for bucket in (2**i for i in range(11)):
        for config in prune(kernel.configs, {"B_BUCKET": bucket, **args}):
            if config not in seen:
                seen.append(config)
    return seen


def _config_label(config) -> str:
    return " ".join(f"{k}={v}" for k, v in config.kwargs.items()) + f" w={config.num_warps}"


def _options(config) -> dict:
    """The launch options a config sets (warps, and ptxas's register limit when it has one)."""
    return {"num_warps": config.num_warps, **({"maxnreg": config.maxnreg} if config.maxnreg else {})}


def triton_cells():
    """``(kernel name, label, fn, args, kwargs, cell)`` for every matrix cell and selectable config."""
    from recjpq.backends.triton import MAX_FUSED_K, codes_stride, num_splits
    from recjpq.kernels import pq_cross_entropy as ce, pq_decode_topk as dec, pq_scores, pq_topk

    programs = 4 * H100_SMS
    f32, i64 = _mock(torch.float32), _mock(torch.int64)
    for dname, dtype in CODE_DTYPES.items():
        codes = _mock(dtype)
        for n in NS:
            stride = codes_stride(n)
            for batch in BATCHES:
                cell = dict(dtype=dname, N=n, B=batch, cfg=0)
                for i, config in enumerate(_selectable(pq_scores.pq_scores_kernel, pq_scores._prune)):
                    yield ("pq_scores", _config_label(config), pq_scores.pq_scores_kernel.fn,
                           (f32, codes, stride, f32, batch, n, _bucket(batch)),
                           dict(M=M, K=K, **config.kwargs, **_options(config)), {**cell, "cfg": i})
                ranges = num_splits(n, batch, programs)
                grid, range_len = ce._launch_shape(batch, n, ranges)
                yield ("pq_logsumexp", f"BLOCK_N={ce._BLOCK_N} QB={ce._QB} w={ce._WARPS}", ce.pq_logsumexp_kernel,
                       (f32, codes, stride, f32, f32, batch, n, range_len, 0.5),
                       dict(M=M, K=K, BLOCK_N=ce._BLOCK_N, QB=ce._QB, num_warps=ce._WARPS), cell)
                yield ("pq_logsumexp_backward", f"atomic BLOCK_N={ce._BLOCK_N} QB={ce._QB} w={ce._WARPS}",
                       ce.pq_logsumexp_backward_kernel, (f32, codes, stride, f32, f32, f32, batch, n, range_len, 0.5),
                       dict(M=M, K=K, BLOCK_N=ce._BLOCK_N, QB=ce._QB, num_warps=ce._WARPS), cell)
                grid, range_len = ce._launch_shape(batch, n, min(ranges, ce._DET_MAX_RANGES), ce._DET_BLOCK_N,
                                                   ce._DET_QB)
                yield ("pq_logsumexp_backward", f"deterministic BLOCK_N={ce._DET_BLOCK_N} QB={ce._DET_QB} "
                       f"K_BLOCK={ce._DET_K_BLOCK} w={ce._DET_WARPS}", ce.pq_logsumexp_backward_partial_kernel,
                       (f32, codes, stride, f32, f32, f32, batch, n, range_len, 0.5),
                       dict(M=M, K=K, BLOCK_N=ce._DET_BLOCK_N, QB=ce._DET_QB, K_BLOCK=ce._DET_K_BLOCK,
                            num_warps=ce._DET_WARPS), cell)
                for k in KS:
                    if k > n:
                        continue
                    for excluded in (0, EXCLUDED):
                        cell = dict(dtype=dname, N=n, B=batch, k=k, E=excluded, cfg=0)
                        if k > MAX_FUSED_K:
                            yield ("pq_topk", "k > MAX_FUSED_K: reference fallback, no kernel", None, (), {}, cell)
                            continue
                        kt = pq_topk.key_slots(k)
                        splits = num_splits(n, batch, programs, kt=kt)
                        steps = dict(KT=kt, EXCLUDE_STEPS=excluded.bit_length())
                        for i, config in enumerate(_selectable(pq_topk.pq_topk_kernel, pq_topk._prune, **steps)):
                            yield ("pq_topk", f"{_config_label(config)} KT={kt} E={'yes' if excluded else 'no'}",
                                   pq_topk.pq_topk_kernel.fn,
                                   (f32, codes, stride, i64, i64, batch, n, excluded, splits, _bucket(batch)),
                                   dict(M=M, K=K, **steps, **config.kwargs, **_options(config)),
                                   {**cell, "cfg": i})
                        if k > (dec.MAX_DECODE_K_EXCLUDING if excluded else dec.MAX_DECODE_K):
                            continue  # pq_topk_query answers it with pq_topk
                        for algorithm, (operand, precision, _, _) in dec.DECODE_ALGORITHMS.items():
                            q = _mock(operand)
                            shape = dict(M=M, DSUB=DSUB, INPUT_PRECISION=precision)
                            for i, config in enumerate(_selectable(dec.decode_threshold_kernel, dec._prune, **steps)):
                                yield ("decode_threshold", f"{algorithm} {_config_label(config)} KT={kt} "
                                       f"E={'yes' if excluded else 'no'}", dec.decode_threshold_kernel.fn,
                                       (q, q, codes, stride, i64, i64, batch, n, K, excluded, splits, _bucket(batch)),
                                       dict(**shape, **steps, **config.kwargs, **_options(config)),
                                       {**cell, "cfg": i, "alg": algorithm})
                            if excluded:
                                continue  # pass 2 never reads exclusions
                            capacity = dec.candidate_capacity(k, n)
                            for i, config in enumerate(_selectable(dec.decode_candidates_kernel, dec._prune)):
                                yield ("decode_candidates", f"{algorithm} {_config_label(config)}",
                                       dec.decode_candidates_kernel.fn,
                                       (q, q, codes, stride, f32, _mock(torch.int32), _mock(torch.int32), batch, n, K,
                                        capacity, _bucket(batch)),
                                       dict(**shape, **config.kwargs, **_options(config)),
                                       {**cell, "cfg": i, "alg": algorithm})


_BINDERS: dict = {}


def _specialisation(fn, args, kwargs, arch: int):
    """What Triton's launcher would compile for this call: (ASTSource inputs, options)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    if (fn, arch) not in _BINDERS:
        target = GPUTarget("cuda", arch, 32)
        backend = make_backend(target)
        _BINDERS[fn, arch] = target, backend, create_function_from_signature(fn.signature, fn.params, backend)
    target, backend, binder = _BINDERS[fn, arch]
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return target, signature, constexprs, attrs, options


def _spec_key(fn, args, kwargs, arch):
    target, signature, constexprs, attrs, options = _specialisation(fn, args, kwargs, arch)
    return (fn.__name__, arch, repr(sorted(signature.items())), repr(sorted(constexprs.items())),
            repr(sorted(attrs.items())), repr(sorted(options.__dict__.items())))


def plan(arches, sample: bool = False) -> list[Variant]:
    """The deduplicated Triton variants for ``arches``, each with the cells that launch it."""
    variants: dict = {}
    for arch in arches:
        for kernel, label, fn, args, kwargs, cell in triton_cells():
            if sample and not _in_sample(cell):
                continue
            key = ("fallback", kernel, label) if fn is None else _spec_key(fn, args, kwargs, arch)
            variant = variants.get(key)
            if variant is None:
                variant = variants[key] = Variant(kernel, label, fn, args, kwargs)
                variant.result["arch"] = arch
            variant.cells.append(cell)
    return list(variants.values())


def _in_sample(cell: dict) -> bool:
    """The base (int32 codes, the widest loads; exclusions on; tf32 decode): every config and k.
    One axis off the base (another code width, algorithm, or no exclusions): k = 10 only, and
    for the code width and algorithm the first config only. Every N and B stays."""
    off = (cell["dtype"] != "int32", cell.get("alg", "decode") != "decode", cell.get("E", EXCLUDED) == 0)
    if not any(off):
        return True
    return sum(off) == 1 and cell.get("k", 10) == 10 and (cell["cfg"] == 0 or off[2])


def _resources(cubin: bytes) -> dict:
    """Registers, stack (spills and local arrays) and static shared memory from cuobjdump."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        tool = shutil.which("cuobjdump") or tool
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    usage = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", out))
    return {"regs": int(usage["REG"]), "stack": int(usage["STACK"]) + int(usage["LOCAL"]),
            "static_smem": int(usage["SHARED"])}


def compile_triton(variant: Variant) -> dict:
    """Compiles one variant; returns its resources, or the error."""
    from triton.compiler import ASTSource

    arch = variant.result["arch"]
    start = time.perf_counter()
    try:
        target, signature, constexprs, attrs, options = _specialisation(variant.fn, variant.args, variant.kwargs, arch)
        kernel = triton.compile(ASTSource(variant.fn, signature, constexprs, attrs), target=target,
                                options=options.__dict__)
        result = _resources(kernel.asm["cubin"])
        result["smem"] = kernel.metadata.shared + result.pop("static_smem")
        result["warps"] = kernel.metadata.num_warps
    except Exception as e:  # compiler errors come in many types; the table reports them all
        first = str(e).strip().splitlines()
        result = {"error": f"{type(e).__name__}: {first[-1] if first else ''}"[:300]}
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def h100_occupancy(regs: int, smem: int, warps: int) -> float:
    """Theoretical occupancy (resident warps / 64) of an sm_90 SM: 64K registers allocated per
    warp in units of 256, 228 KB shared memory with 1 KB reserved per CTA, 32 CTAs, 64 warps."""
    regs_per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    by_regs = 65536 // (regs_per_warp * warps)
    by_smem = (228 * 1024) // (smem + 1024)
    ctas = min(by_regs, by_smem, 32, 64 // warps)
    return ctas * warps / 64


# ---------------------------------------------------------------------------------------------
# CUDA: every template instance of csrc/cuda/*.cu, from ptxas's report.

def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found is None and os.environ.get("CUDA_HOME"):
        found = os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
    return found if found and os.path.exists(found) else None


_PTXAS_FUNCTION = re.compile(r"Compiling entry function '(\w+)' for '(sm_\d+)'")
_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")


def _demangle(names: list[str]) -> list[str]:
    tool = shutil.which("c++filt")
    if tool is None:
        return names
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    if len(out) != len(names):
        return names
    return [re.sub(r"\(.*\)$", "", s).removeprefix("void ").replace("recjpq_cuda::", "")
            .replace("unsigned char", "uint8").replace("short", "int16").replace("int,", "int32,") for s in out]


def cuda_variants(arches, nvcc: str) -> list[Variant]:
    """One Variant per kernel instance and architecture, from ``nvcc -Xptxas -v`` of each .cu."""
    from recjpq.backends.cuda import THREADS, buffer_len, smem_bytes

    found = []
    for source in sorted(glob.glob(os.path.join(CUDA_DIR, "*.cu"))):
        for arch in arches:
            with tempfile.TemporaryDirectory() as tmp:
                cmd = [nvcc, "-std=c++17", "-O3", f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v",
                       "-c", source, "-o", os.path.join(tmp, "out.o")]
                run = subprocess.run(cmd, capture_output=True, text=True)
            name = os.path.basename(source)
            if run.returncode != 0:
                v = Variant(f"cuda {name}", "(nvcc failed)")
                v.result = {"arch": arch, "error": (run.stdout + run.stderr).strip()[-300:]}
                found.append(v)
                continue
            log = (run.stdout + run.stderr).splitlines()
            entries = []
            for i, line in enumerate(log):
                match = _PTXAS_FUNCTION.search(line)
                if match:
                    block = "\n".join(log[i + 1:i + 4])
                    spill = _PTXAS_SPILL.search(block)
                    used = _PTXAS_USED.search(block)
                    smem = _PTXAS_SMEM.search(block)
                    entries.append((match.group(1), int(used.group(1)) if used else 0,
                                    int(spill.group(2)) + int(spill.group(3)) + int(spill.group(1)) if spill else 0,
                                    int(smem.group(1)) if smem else 0))
            for label, (_, regs, stack, static_smem) in zip(_demangle([e[0] for e in entries]), entries):
                qb = int(re.search(r",\s*(\d+)>", label).group(1)) if re.search(r",\s*(\d+)>", label) else 1
                # dynamic shared memory at the headline M = 8, K = 256 (k = 10 for top-k)
                dynamic = smem_bytes(M, K, qb, buffer_len(10) if "topk" in label else 0)
                v = Variant(f"cuda {label.split('<')[0]}", label[label.find("<"):] if "<" in label else label)
                v.result = {"arch": arch, "regs": regs, "stack": stack, "smem": static_smem + dynamic,
                            "warps": THREADS // 32}
                v.cells.append({"source": name})
                found.append(v)
    return found


# ---------------------------------------------------------------------------------------------

def _cells_summary(cells: list) -> str:
    """The cells a variant covers, as value sets per axis (N and B collapse when all are there)."""
    if not cells or "source" in cells[0]:
        return ""
    parts = []
    for axis in ("dtype", "k", "E", "N", "B"):
        values = sorted({c[axis] for c in cells if axis in c}, key=lambda x: (isinstance(x, str), x))
        if values:
            parts.append(f"{axis}={','.join(str(v) for v in values)}")
    return " ".join(parts)


def failures(variants) -> list[str]:
    bad = []
    for v in variants:
        r = v.result
        if "error" in r:
            bad.append(f"{v.kernel} [{v.label}] sm_{r['arch']}: {r['error']}")
        elif r.get("stack", 0) > 0 and any(word in v.kernel for word in MUST_NOT_SPILL):
            bad.append(f"{v.kernel} [{v.label}] sm_{r['arch']}: {r['stack']} bytes of local memory (spills)")
    return bad


def table(variants) -> str:
    lines = ["| kernel | variant | arch | regs | stack B | smem B | H100 occupancy | cells |",
             "|---|---|---|---:|---:|---:|---:|---|"]
    for v in sorted(variants, key=lambda v: (v.kernel, v.result.get("arch", 0), v.label)):
        r = v.result
        if "error" in r:
            lines.append(f"| {v.kernel} | {v.label} | sm_{r['arch']} | ERROR | | | | {r['error']} |")
        elif "regs" not in r:
            lines.append(f"| {v.kernel} | {v.label} | | | | | | {_cells_summary(v.cells)} |")
        else:
            occupancy = h100_occupancy(r["regs"], r["smem"], r["warps"]) if r["arch"] == 90 else None
            occ = "" if occupancy is None else f"{occupancy:.0%}"
            lines.append(f"| {v.kernel} | {v.label} | sm_{r['arch']} | {r['regs']} | {r['stack']} | {r['smem']} | "
                         f"{occ} | {_cells_summary(v.cells)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel Triton compiles")
    parser.add_argument("--sample", action="store_true", help="each axis value at least once (see module doc)")
    parser.add_argument("--no-cuda", action="store_true", help="skip the nvcc part")
    parser.add_argument("--only", help="compile only variants whose 'kernel [variant]' contains this")
    parser.add_argument("--list", action="store_true", help="print the planned variants, compile nothing")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    variants = plan(args.arch, args.sample)
    if args.only:
        variants = [v for v in variants if args.only in f"{v.kernel} [{v.label}]"]
    todo = [v for v in variants if v.fn is not None]
    if args.list:
        print(table(variants))
        return 0
    print(f"Triton {triton.__version__}, torch {torch.__version__}: {sum(len(v.cells) for v in variants)} cells, "
          f"{len(todo)} distinct Triton specialisations for sm_{'/sm_'.join(map(str, args.arch))}", flush=True)
    with concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(_compile_in_worker, v.fn.fn.__module__, v.fn.fn.__name__, v.args, v.kwargs,
                               v.result["arch"]): v for v in todo}
        for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
            variant = futures[future]
            r = variant.result
            r.update(future.result())
            outcome = r["error"] if "error" in r else f"{r['regs']} regs, {r['stack']} B stack"
            print(f"  [{done}/{len(todo)}] {variant.kernel} [{variant.label}] sm_{r['arch']}: {outcome} "
                  f"({r['seconds']} s)", flush=True)
    nvcc = None if args.no_cuda else _nvcc()
    if nvcc is not None:
        variants += cuda_variants(args.arch, nvcc)
    elif not args.no_cuda:
        print("nvcc not found (PATH or CUDA_HOME): CUDA kernels not compiled")
    print(table(variants))
    bad = failures(variants)
    elapsed = time.perf_counter() - start
    print(f"\n{len(variants)} variants, {len(bad)} failures, {elapsed:.0f} s")
    for line in bad:
        print("FAIL", line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "arches": args.arch, "seconds": round(elapsed),
                       "rows": [{"kernel": v.kernel, "variant": v.label, **v.result, "cells": v.cells}
                                for v in variants]}, f, indent=1, default=str)
    return 1 if bad else 0


def _compile_in_worker(module: str, name: str, args, kwargs, arch: int) -> dict:
    """Process-pool entry: JITFunctions do not pickle, so the worker imports the kernel by name."""
    import importlib

    from triton.runtime.jit import JITFunction

    kernel = getattr(importlib.import_module(module), name)
    variant = Variant("", "", kernel if isinstance(kernel, JITFunction) else kernel.fn, args, kwargs)
    variant.result["arch"] = arch
    return compile_triton(variant)


if __name__ == "__main__":
    sys.exit(main())
