"""Conversion throughput and memory benchmark (a script, not a test).

    python benchmarks/convert.py [--layers 24] [--hidden 1024] [--vocab 50257] [--out DIR]
                                 [--workers 2] [--repeat 3] [--tmp DIR] [--quick]

Builds a synthetic GPT checkpoint (random fp32 tensors, written rank by rank and tensor by tensor
straight from the layout, no megatron model: default 24 layers x hidden 1024, vocab 50257, TP=2,
PP=2, about 1.6 GB with the last stage's tied output-layer copy), then times, each in a fresh
subprocess:

  copy         cp -r of the checkpoint (the floor: reading and writing every byte once)
  reshard      to TP=1, PP=1 (one target rank: one process holds the whole model's stream)
  coalesce     width factor 2 + depth factor 2 (to the small level, the source's TP/PP)
  interpolate  de-coalesce the coalesced checkpoint and interpolate with the original (alpha 0.5)

and repeats it at half the depth to show that memory does not grow with the number of layers.
Columns: seconds (the conversion itself, as run_conversion measures it; "wall" adds interpreter
start-up and imports), GB written, GB/s, peak RSS (the largest single process, ru_maxrss over the
process tree; and the sum over the tree, polled from /proc), ratio to the copy time. Targets:
every conversion within 2x the copy time; peak RSS under 1 GB + 3x the largest layer, taken as the
largest of a transformer layer and the word embeddings (the largest tensor); the JSON also has the
strict variant with the transformer layer alone. Each measurement runs --repeat times (after
deleting its output and a sync): the fastest run's times and the largest peak RSS are reported.
Results go to a table and to DIR/convert.json. Checkpoints live in a temporary directory (under
--tmp, default /tmp) that is deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GB = 1e9
MB = 2 ** 20


# -- the synthetic checkpoint ------------------------------------------------------------------
def model_config(layers: int, hidden: int, vocab: int):
    from mlmega.config.model import ModelConfig

    return ModelConfig(arch="gpt", num_layers=layers, hidden_size=hidden,
                       num_attention_heads=hidden // 64, vocab_size=vocab,
                       max_sequence_length=2048)


def build_checkpoint(cfg, root: Path, tp: int, pp: int, iteration: int = 100) -> None:
    """Random shards written tensor by tensor (LazyTensor): memory stays at one tensor."""
    import torch

    from mlmega.checkpoint.layout import ShardLayout
    from mlmega.checkpoint.streaming import LazyTensor, reuse_freed_memory
    from mlmega.checkpoint.directory import TRACKER
    from mlmega.checkpoint.torch_format import write_rank_file

    reuse_freed_memory()
    layout = ShardLayout(cfg, tp, pp)
    gen = torch.Generator().manual_seed(0)

    def random(shape):
        return LazyTensor(lambda: torch.empty(shape).uniform_(-0.05, 0.05, generator=gen))

    for tp_rank, pp_rank in layout.ranks:
        model = {p.local_name: random(layout.local_shape(p.spec))
                 for p in layout.pp_stage_params(pp_rank)}
        write_rank_file(root, layout, tp_rank, pp_rank, model, iteration)
    (root / TRACKER).write_text(str(iteration))


def sizes(cfg) -> dict:
    """Bytes of the whole model, of its largest transformer layer and of its largest tensor."""
    from mlmega.models.params import iter_params, param_shapes

    shapes = param_shapes(cfg)
    layer_bytes: dict[int, int] = {}
    largest_tensor, total = ("", 0), 0
    for name, spec, layer in iter_params(cfg):
        n = 4
        for d in shapes[name]:
            n *= d
        total += n
        if layer is not None:
            layer_bytes[layer] = layer_bytes.get(layer, 0) + n
        if n > largest_tensor[1]:
            largest_tensor = (name, n)
    return dict(model_bytes=total, largest_layer_bytes=max(layer_bytes.values()),
                largest_tensor=largest_tensor[0], largest_tensor_bytes=largest_tensor[1])


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# -- measuring a subprocess ----------------------------------------------------------------------
def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


def _rss(pid: int) -> tuple[int, int]:
    """(VmRSS, RssAnon) bytes of one process, 0s if it is gone."""
    rss = anon = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("RssAnon:"):
                    anon = int(line.split()[1]) * 1024
    except OSError:
        pass
    return rss, anon


def measure(cmd: list[str]) -> dict:
    """Run ``cmd``; wall seconds, its stdout, ru_maxrss over its tree, polled tree-sum peaks."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = {"tree_rss": 0, "tree_anon": 0}
    done = threading.Event()

    def poll():
        while not done.is_set():
            totals = [_rss(p) for p in _tree(proc.pid)]
            peak["tree_rss"] = max(peak["tree_rss"], sum(t[0] for t in totals))
            peak["tree_anon"] = max(peak["tree_anon"], sum(t[1] for t in totals))
            done.wait(0.02)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    out_chunks, err_chunks = [], []
    readers = [threading.Thread(target=lambda: out_chunks.append(proc.stdout.read())),
               threading.Thread(target=lambda: err_chunks.append(proc.stderr.read()))]
    for r in readers:
        r.start()
    _, status, usage = os.wait4(proc.pid, 0)  # this child's (and its waited-for tree's) rusage
    wall = time.monotonic() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    done.set()
    poller.join()
    for r in readers:
        r.join()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{''.join(err_chunks)}")
    return dict(wall=wall, stdout="".join(out_chunks), maxrss=usage.ru_maxrss * 1024, **peak)


def run_one(spec: dict) -> None:
    """Subprocess entry: one conversion through the Python API the CLI uses; prints JSON."""
    t0 = time.monotonic()
    from mlmega.checkpoint.convert import run_conversion
    from mlmega.checkpoint.convert_plan import plan_conversion
    from mlmega.operators import LevelSchemes

    imported = time.monotonic()
    schemes = (LevelSchemes.from_factors(spec["width"], spec["depth"])
               if spec.get("width") or spec.get("depth") else None)
    plan = plan_conversion(spec["op"], spec["src"], spec["dst"], target_tp=spec.get("tp"),
                           target_pp=spec.get("pp"), schemes=schemes, large=spec.get("large"),
                           alpha=spec.get("alpha"))
    planned = time.monotonic()
    summary = run_conversion(plan, workers=spec["workers"], log=lambda *a: None)
    converted = time.monotonic()
    print(json.dumps(dict(import_s=imported - t0, plan_s=planned - imported,
                          convert_s=converted - planned, summary=summary)))


# -- the benchmark ---------------------------------------------------------------------------
def bench_size(layers: int, args, work: Path, log) -> dict:
    cfg = model_config(layers, args.hidden, args.vocab)
    info = sizes(cfg)
    target_rss = GB + 3 * max(info["largest_layer_bytes"], info["largest_tensor_bytes"])
    strict_rss = GB + 3 * info["largest_layer_bytes"]
    base = work / f"L{layers}"
    src = base / "src"
    log(f"\n== {layers} layers x hidden {args.hidden}, vocab {args.vocab}: model "
        f"{info['model_bytes'] / GB:.2f} GB; largest layer {info['largest_layer_bytes'] / MB:.0f} "
        f"MiB, largest tensor {info['largest_tensor']} {info['largest_tensor_bytes'] / MB:.0f} MiB; "
        f"RSS target {target_rss / MB:.0f} MiB (strict, transformer layer only: "
        f"{strict_rss / MB:.0f} MiB)")
    t = time.monotonic()
    build = measure([sys.executable, __file__, "--_build", json.dumps(
        dict(layers=layers, hidden=args.hidden, vocab=args.vocab, root=str(src)))])
    log(f"built {src} ({dir_bytes(src) / GB:.2f} GB at TP=2, PP=2) in {time.monotonic() - t:.1f} s, "
        f"peak RSS {build['maxrss'] / MB:.0f} MiB")
    src_bytes = dir_bytes(src)
    rows = []

    def record(name, runs, extra=None):
        """One row from ``runs`` [(measure() dict, seconds, bytes written)]: the fastest run's
        times, the largest peak RSS of all runs."""
        m, seconds, written = min(runs, key=lambda r: r[1])
        rows.append(dict(name=name, seconds=seconds, wall=m["wall"], gb_written=written / GB,
                         gb_per_s=written / GB / seconds,
                         peak_rss_mb=max(r[0]["maxrss"] for r in runs) / MB,
                         tree_rss_mb=max(r[0]["tree_rss"] for r in runs) / MB,
                         tree_anon_mb=max(r[0]["tree_anon"] for r in runs) / MB,
                         all_seconds=[r[1] for r in runs], **(extra or {})))
        log(f"  {name:12s} {seconds:7.2f} s (runs: {', '.join(f'{r[1]:.2f}' for r in runs)})  "
            f"{written / GB:5.2f} GB  peak RSS {rows[-1]['peak_rss_mb']:6.0f} MiB "
            f"(tree {rows[-1]['tree_rss_mb']:.0f})")

    def settle():
        os.sync()  # do not let one run's write-back land in the next one's timing

    runs = []
    for _ in range(args.repeat):
        shutil.rmtree(base / "copy", ignore_errors=True)
        settle()
        m = measure(["cp", "-r", str(src), str(base / "copy")])
        runs.append((m, m["wall"], dir_bytes(base / "copy")))
    shutil.rmtree(base / "copy")
    record("copy", runs)
    convs = [
        ("reshard", dict(op="reshard", dst="tp1pp1", tp=1, pp=1, workers=1)),
        ("coalesce", dict(op="coalesce", dst="small", width=2, depth=2, workers=args.workers)),
        ("interpolate", dict(op="interpolate", src="small", dst="mixed", width=2, depth=2,
                             large=str(src), alpha=0.5, workers=args.workers)),
    ]
    for name, spec in convs:
        spec = dict(spec, src=str(base / spec["src"]) if "src" in spec else str(src),
                    dst=str(base / spec["dst"]))
        runs = []
        for _ in range(args.repeat):
            shutil.rmtree(spec["dst"], ignore_errors=True)
            settle()
            m = measure([sys.executable, __file__, "--_run", json.dumps(spec)])
            result = json.loads(m["stdout"].strip().splitlines()[-1])
            m.update(plan_s=result["plan_s"], import_s=result["import_s"], summary=result["summary"])
            runs.append((m, result["convert_s"], dir_bytes(Path(spec["dst"]))))
        fastest = min(runs, key=lambda r: r[1])[0]
        record(name, runs, dict(plan_s=fastest["plan_s"], import_s=fastest["import_s"],
                                workers=spec["workers"], target=f"TP={fastest['summary']['tp']},"
                                                                f"PP={fastest['summary']['pp']}"))
        if name != "coalesce":
            shutil.rmtree(spec["dst"])
    copy_s = rows[0]["seconds"]
    for row in rows:
        row["ratio_to_copy"] = row["seconds"] / copy_s
        row["time_ok"] = row["name"] == "copy" or row["ratio_to_copy"] <= 2.0
        row["rss_ok"] = row["peak_rss_mb"] * MB <= target_rss
        row["rss_ok_strict"] = row["peak_rss_mb"] * MB <= strict_rss
    shutil.rmtree(base)
    return dict(layers=layers, hidden=args.hidden, vocab=args.vocab, checkpoint_gb=src_bytes / GB,
                rss_target_mb=target_rss / MB, rss_target_strict_mb=strict_rss / MB,
                build_peak_rss_mb=build["maxrss"] / MB,
                **{k: (v / MB if k.endswith("bytes") else v) for k, v in info.items()},
                rows=rows)


def print_tables(results: list[dict]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # plain text
        Console = None
    for res in results:
        title = (f"{res['layers']} layers x hidden {res['hidden']} (checkpoint "
                 f"{res['checkpoint_gb']:.2f} GB at TP=2,PP=2; largest layer "
                 f"{res['largest_layer_bytes']:.0f} MiB, largest tensor "
                 f"{res['largest_tensor_bytes']:.0f} MiB; RSS target {res['rss_target_mb']:.0f} MiB)")
        head = ["run", "target", "workers", "seconds", "wall s", "GB written", "GB/s",
                "peak RSS MiB", "tree RSS MiB", "x copy", "ok"]
        lines = []
        for r in res["rows"]:
            ok = ("time " if r["time_ok"] else "TIME! ") + ("rss" if r["rss_ok"] else "RSS!")
            lines.append([r["name"], r.get("target", "TP=2,PP=2"), str(r.get("workers", "-")),
                          f"{r['seconds']:.2f}", f"{r['wall']:.2f}", f"{r['gb_written']:.2f}",
                          f"{r['gb_per_s']:.2f}", f"{r['peak_rss_mb']:.0f}",
                          f"{r['tree_rss_mb']:.0f}", f"{r['ratio_to_copy']:.2f}", ok])
        if Console is not None:
            table = Table(title=title)
            for h in head:
                table.add_column(h, justify="left" if h in ("run", "target", "ok") else "right")
            for line in lines:
                table.add_row(*line)
            Console(width=160).print(table)
        else:
            print(title)
            widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]
            for line in [head] + lines:
                print("  ".join(c.rjust(w) for c, w in zip(line, widths)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--workers", type=int, default=2,
                        help="worker processes for the multi-rank conversions")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of each measurement; the fastest is reported (shared machines "
                             "are noisy), the largest peak RSS")
    parser.add_argument("--out", default=".", help="directory for convert.json")
    parser.add_argument("--tmp", default=None, help="where the checkpoints go (default: /tmp)")
    parser.add_argument("--quick", action="store_true", help="a small model (smoke test)")
    parser.add_argument("--_build", help=argparse.SUPPRESS)
    parser.add_argument("--_run", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._build:
        spec = json.loads(args._build)
        build_checkpoint(model_config(spec["layers"], spec["hidden"], spec["vocab"]),
                         Path(spec["root"]), tp=2, pp=2)
        return 0
    if args._run:
        run_one(json.loads(args._run))
        return 0
    if args.quick:
        args.layers, args.hidden, args.vocab = 8, 256, 5000
    work = Path(tempfile.mkdtemp(prefix="mlmega-bench-", dir=args.tmp))
    results = []
    try:
        for layers in (args.layers, args.layers // 2):
            results.append(bench_size(layers, args, work, lambda *a: print(*a, flush=True)))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_tables(results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    report = dict(machine=dict(cpus=os.cpu_count(), python=sys.version.split()[0],
                               torch=torch.__version__, load_average=os.getloadavg()),
                  workers=args.workers, repeat=args.repeat, results=results)
    (out / "convert.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {out / 'convert.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
