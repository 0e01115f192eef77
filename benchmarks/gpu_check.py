"""One-command accelerator check of the DDPM CIFAR-10 U-Net (35.7M parameters), under 8 minutes:

    python benchmarks/gpu_check.py [--out gpu_check_results.json] [--budget_s 450] [--peer]
                                   [--config cifar10_cosine] [--checks train,sample,peer]
    python benchmarks/gpu_check.py --smoke          # tiny U-Net, seconds-to-minutes on a CPU

1. Train steps/s at batch 128 (--config, by default configs/cifar10_linear.py: DDPM's step with
   dropout, clipping, Adam, EMA; experiment.train's pmapped K-step call, K=--k), float32 and
   bfloat16 (bf16 compute, fp32 parameters), with model FLOPs per step (common.hand_flops: the
   convolutions and attention matmuls, forward and backward) and MFU against the device's table
   peak (common.PEAK_TFLOPS; float32 against both the fp32 and the TF32 peak, since XLA's default
   matmul precision may use TF32). XLA's cost analysis is printed beside it but not used: on GPU
   the convolutions are cuDNN custom calls that it does not count (it gave 175 (float32) and 391
   (bfloat16) of the 4461 GFLOP per step at batch 128 on an H200). Beside the rate of calls waited
   for one by one, the rate with the calls back to back, waited for at the end
   (common.TrainCall.pipelined_s), as experiment.train makes them: the host's dispatch of a call
   then overlaps the device's work.
2. 50-step DDIM (eta 0) throughput: the whole 50-step ddim_sample as one jitted scan at
   --sample_batch, float32 and bfloat16, with its MFU from the hand count of the forward;
   --sample_calls timed calls (median), and the time for
   --num_samples (50,000) samples EXTRAPOLATED linearly from them (labelled as such), unless
   --sample_all runs them all.
3. Peak memory of each executable from memory_analysis() (arguments + outputs + temporaries -
   donated), and the device's peak_bytes_in_use where the backend reports it.
4. With --peer (needs torch with CUDA, diffusers): diffusers' UNet2DModel train step (autocast for
   bf16) at the same batch, and its one-step sampling time, and the ratios ours / peer. After the
   JAX checks the peer runs in a process of its own (JAX's allocator keeps the memory it grew to;
   in one process PyTorch ran out of memory on an 80 GiB H100).

Steps that would start after --budget_s seconds are skipped and listed as skipped. Results go to
--out (JSON) and a text table next to it (same name, .txt).
"""
import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave memory for the PyTorch peer
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

import ddm  # noqa: E402


def device_memory_peak():
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 - not every backend has memory_stats
        stats = {}
    return stats.get("peak_bytes_in_use")


def gib(n):
    return f"{n / 2 ** 30:.2f} GiB" if n else "n/a"


def train_check(args, dtype_name, overrides, results):
    call = common.TrainCall(args.config, dtype_name, args.batch, args.k, **overrides)
    compiled = call.compile()
    xla_flops = call.flops_per_step()
    flops = common.hand_flops(call.model, call.image_shape, args.batch)["train"]
    call.materialize()
    call()  # warm-up
    times = common.interleaved([call], args.train_calls)[0]
    steps_per_s = args.k / common.median(times)
    pipelined_steps_per_s = args.k / call.pipelined_s(args.train_calls)
    row = {"what": f"train step, batch {args.batch}", "dtype": dtype_name, "steps_per_s": steps_per_s,
           "pipelined_steps_per_s": pipelined_steps_per_s,
           "images_per_s": steps_per_s * args.batch, "model_gflop_per_step": flops / 1e9,
           "xla_gflop_per_step": xla_flops / 1e9,
           "tflop_per_s": flops * steps_per_s / 1e12, "mfu": common.mfu_text(flops * steps_per_s, dtype_name),
           "compile_s": call.compile_s, "memory": common.peak_bytes(compiled),
           "device_peak_bytes_in_use": device_memory_peak(), "timed_calls": len(times), "k": args.k}
    results["rows"].append(row)
    print(f"[train {dtype_name}] {steps_per_s:.2f} steps/s ({row['images_per_s']:.0f} images/s; "
          f"{pipelined_steps_per_s:.2f} steps/s with the calls back to back, as experiment.train makes them), "
          f"{flops / 1e9:.1f} model GFLOP/step (XLA counts {xla_flops / 1e9:.1f}), {row['tflop_per_s']:.1f} TFLOP/s, "
          f"MFU {row['mfu']}; "
          f"memory peak {gib(row['memory'].get('peak'))}, compile {call.compile_s:.0f} s", flush=True)


def sample_check(args, dtype_name, overrides, results):
    call = common.SampleScanCall(args.config, dtype_name, args.sample_batch, args.ddim_steps, **overrides)
    call.compile()
    call.materialize()
    call()  # warm-up
    calls = -(-args.num_samples // args.sample_batch)
    timed = calls if args.sample_all else min(args.sample_calls, calls)
    times = []
    for _ in range(timed):
        start = time.perf_counter()
        images = call()
        times.append(time.perf_counter() - start)
    assert np.isfinite(np.asarray(images)).all()
    per_call = common.median(times)
    total = sum(times) if args.sample_all else per_call * calls
    label = "measured (all calls)" if args.sample_all else f"EXTRAPOLATED from {timed} timed call(s) x {calls} calls"
    flops = common.hand_flops(call.model, call.image_shape, args.sample_batch)["forward"] * args.ddim_steps / per_call
    row = {"what": f"DDIM {args.ddim_steps} steps, batch {args.sample_batch}", "dtype": dtype_name,
           "s_per_call": per_call, "samples_per_s": args.sample_batch / per_call,
           "tflop_per_s": flops / 1e12, "mfu": common.mfu_text(flops, dtype_name),
           "seconds_for_num_samples": total, "num_samples": args.num_samples, "how": label,
           "compile_s": call.compile_s, "memory": common.peak_bytes(call.compiled),
           "device_peak_bytes_in_use": device_memory_peak()}
    results["rows"].append(row)
    print(f"[sample {dtype_name}] {row['samples_per_s']:.0f} samples/s ({per_call:.2f} s per call of "
          f"{args.sample_batch}); {args.num_samples} samples: {total:.0f} s = {total / 60:.1f} min ({label}); "
          f"{row['tflop_per_s']:.1f} TFLOP/s, MFU {row['mfu']}; "
          f"memory peak {gib(row['memory'].get('peak'))}, compile {call.compile_s:.0f} s", flush=True)


def peer_check(args, overrides, results):
    import torch

    if not torch.cuda.is_available() and not args.smoke:
        results["skipped"].append("peer: torch has no CUDA device")
        return
    from sampling_step import TorchRunner as TorchSampleRunner

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    for dtype_name in args.dtypes.split(","):
        runner = common.TorchTrainCall(args.config, dtype_name, args.batch, args.k, **overrides)
        times = common.interleaved([runner], args.train_calls)[0]
        rate = args.k / common.median(times)
        results["rows"].append({"what": f"PEER diffusers train step, batch {args.batch}", "dtype": dtype_name,
                                "steps_per_s": rate})
        print(f"[peer train {dtype_name}] {rate:.2f} steps/s", flush=True)
        _, model, diffusion, image_shape = common.build(args.config, dtype_name, **overrides)
        d = ddm.respace(diffusion, ddm.space_timesteps(diffusion.num_timesteps, f"ddim{args.ddim_steps}"))
        sampler = TorchSampleRunner(model, d, image_shape, args.sample_batch, dtype_name,
                                    "cuda" if torch.cuda.is_available() else "cpu")
        times = common.interleaved([sampler], 3)[0]
        per_step = common.median(times)
        results["rows"].append({"what": f"PEER diffusers one DDIM step, batch {args.sample_batch}",
                                "dtype": dtype_name, "s_per_step": per_step,
                                "samples_per_s_for_ddim_steps": args.sample_batch / (per_step * args.ddim_steps)})
        print(f"[peer sample {dtype_name}] {per_step * 1e3:.1f} ms per step of {args.sample_batch} "
              f"(x{args.ddim_steps} steps: {args.sample_batch / (per_step * args.ddim_steps):.0f} samples/s)",
              flush=True)


def peer_in_child(args, results):
    """The peer in a process of its own: JAX's allocator keeps what the train and sampling checks
    grew it to (on an 80 GiB H100 that left PyTorch under 1 GiB: out of memory at batch 128)."""
    out = os.path.splitext(args.out)[0] + "_peer.json"
    argv = [sys.executable, os.path.abspath(__file__), "--peer", "--checks", "peer", "--out", out]
    for name in ("config", "batch", "k", "train_calls", "dtypes", "ddim_steps", "sample_batch"):
        argv += [f"--{name}", str(getattr(args, name))]
    subprocess.run(argv + (["--smoke"] if args.smoke else []), check=True)
    with open(out) as f:
        child = json.load(f)
    results["rows"] += child["rows"]
    results["skipped"] += child["skipped"]


def ratio_lines(rows) -> list:
    """'ours / peer' per dtype for the train step (steps/s) and DDIM sampling (samples/s)."""
    lines = []
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        get = lambda peer, key: next((r[key] for r in rows if r["dtype"] == dtype
                                      and r["what"].startswith("PEER") == peer and key in r), None)
        pairs = (("train steps/s", get(False, "steps_per_s"), get(True, "steps_per_s")),
                 ("DDIM samples/s", get(False, "samples_per_s"), get(True, "samples_per_s_for_ddim_steps")))
        lines += [f"ours / peer, {what}, {dtype}: {ours / peer:.2f}x" for what, ours, peer in pairs if ours and peer]
    return [""] + lines if lines else []


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="cifar10_linear",
                        help="a config of configs/ (cifar10_cosine: IDDPM's U-Net, learned-range variances, L_hybrid)")
    parser.add_argument("--smoke", action="store_true", help="tiny U-Net (ch 32), small batches: a CPU check")
    parser.add_argument("--out", default="gpu_check_results.json")
    parser.add_argument("--budget_s", type=float, default=450.0)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--k", type=int, default=4, help="train steps per call")
    parser.add_argument("--train_calls", type=int, default=10)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--ddim_steps", type=int, default=50)
    parser.add_argument("--sample_batch", type=int, default=2000)
    parser.add_argument("--sample_calls", type=int, default=2)
    parser.add_argument("--num_samples", type=int, default=50_000)
    parser.add_argument("--sample_all", action="store_true", help="run all num_samples instead of extrapolating")
    parser.add_argument("--peer", action="store_true", help="also time diffusers (torch + CUDA)")
    parser.add_argument("--checks", default="train,sample,peer",
                        help="which of train, sample, peer to run (peer only with --peer); run the peer alone in "
                             "its own process where JAX's allocator would leave it too little memory")
    args = parser.parse_args()
    overrides = {}
    if args.smoke:
        overrides = {"ch": 32}
        args.batch, args.k, args.train_calls, args.budget_s = 8, 1, 2, 1e9
        args.ddim_steps, args.sample_batch, args.sample_calls, args.num_samples = 3, 8, 1, 64

    start = time.perf_counter()
    results = {"machine": common.machine_line(), "args": vars(args), "rows": [], "skipped": [],
               "model_overrides": overrides}
    print(results["machine"], flush=True)
    checks = args.checks.split(",")
    if set(checks) - {"train", "sample", "peer"}:
        parser.error(f"--checks: {args.checks!r} may name only train, sample and peer")
    tasks = [(f"train {d}", lambda d=d: train_check(args, d, overrides, results))
             for d in args.dtypes.split(",") if "train" in checks]
    tasks += [(f"sample {d}", lambda d=d: sample_check(args, d, overrides, results))
              for d in args.dtypes.split(",") if "sample" in checks]
    if args.peer and "peer" in checks:
        if checks == ["peer"]:
            tasks.append(("peer", lambda: peer_check(args, overrides, results)))
        else:
            tasks.append(("peer", lambda: peer_in_child(args, results)))
    for name, task in tasks:
        elapsed = time.perf_counter() - start
        if elapsed > args.budget_s:
            results["skipped"].append(f"{name}: budget of {args.budget_s:.0f} s spent ({elapsed:.0f} s)")
            print(f"skipped {name}: over budget", flush=True)
            continue
        try:
            task()
        except Exception as e:  # noqa: BLE001 - record and go on with the other checks
            results["skipped"].append(f"{name}: {type(e).__name__}: {e}")
            print(f"FAILED {name}: {type(e).__name__}: {e}", flush=True)
    results["total_s"] = time.perf_counter() - start

    lines = [results["machine"], ""]
    for r in results["rows"]:
        mem = r.get("memory", {}).get("peak")
        back_to_back = f" ({r['pipelined_steps_per_s']:.2f} back to back)" if "pipelined_steps_per_s" in r else ""
        main_value = (f"{r['steps_per_s']:.2f} steps/s{back_to_back}" if "steps_per_s" in r else
                      f"{r['samples_per_s']:.0f} samples/s, {r['num_samples']} samples in "
                      f"{r['seconds_for_num_samples'] / 60:.1f} min ({r['how']})" if "samples_per_s" in r else
                      f"{r['samples_per_s_for_ddim_steps']:.0f} samples/s over {args.ddim_steps} steps")
        extra = f"; MFU {r['mfu']}" if "mfu" in r else ""
        lines.append(f"{r['what']:<40} | {r['dtype']:<8} | {main_value}{extra}"
                     + (f" | memory peak {gib(mem)}" if mem else ""))
    lines += ratio_lines(results["rows"])
    if results["skipped"]:
        lines += ["", "skipped / failed:"] + [f"  {s}" for s in results["skipped"]]
    lines.append(f"\ntotal {results['total_s']:.0f} s")
    text = "\n".join(lines)
    print("\n" + text)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2, default=str)
    with open(os.path.splitext(args.out)[0] + ".txt", "w") as f:
        f.write(text + "\n")
    print(f"wrote {args.out} and {os.path.splitext(args.out)[0]}.txt")


if __name__ == "__main__":
    main()
