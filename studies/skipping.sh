#!/bin/bash
# Empty-space skipping and the background penalty, measured: results.md's skipping table, at the commit checked out.
#   bash studies/skipping.sh [OUT]      (default runs/skipping; about 12 minutes)
# One thread (set CORE to pin it, e.g. CORE=0). data/lego100.npz: results.md's "The lego data behind the results".
. "$(dirname "$0")/script_setup.sh" "${1:-runs/skipping}"
data=(--data=data/lego100.npz --val_views=10 --video=false --wandb=disabled)
# the field's evaluations per step at the paper scale (4 images of 32 samples per ray), with and without the grid
for skip in true false; do
  "${pin[@]}" "$py" exp1.py --scale=paper --steps=6 --log_every=1 --compile=false --skip=$skip "${data[@]}" \
    --out_dir="$out/paper-skip-$skip" > "$out/paper-skip-$skip.log" 2>&1
done
# what the machinery costs on random rays, the grid not carved
"${pin[@]}" "$py" bench.py --model nerf --compile on --amp off --skip both --repeats 5 > "$out/bench_skip.txt" 2>&1
# the background penalty's weight: held-out PSNR and the opacity of the black pixels' rays after 1500 steps
for weight in 0 1e-3 1e-2; do
  run="$out/bg-$weight"
  "${pin[@]}" "$py" exp1.py --scale=cpu --steps=1500 --compile=false --bg_opacity_weight=$weight "${data[@]}" \
    --out_dir="$run" > "$run.log" 2>&1
done
for run in "$out"/paper-skip-* "$out"/bg-*; do
  [[ -d "$run" ]] && "${pin[@]}" "$py" evaluate.py --ckpt "$run/ckpt.pt" --data=data/lego100.npz --json "$run/eval.json" > /dev/null
done
"$py" - "$out" > "$out/summary.md" <<'PY'
import glob, json, os, sys
out = sys.argv[1]
print("| run | steps | points a step | s a step | held-out PSNR (dB) | background opacity |")
print("|---|---:|---:|---:|---:|---:|")
for run in sorted(glob.glob(os.path.join(out, "paper-skip-*")) + glob.glob(os.path.join(out, "bg-*"))):
    if not os.path.isdir(run):
        continue
    records = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl")) if '"points_per_step"' in line]
    summary, ev = json.load(open(os.path.join(run, "summary.json"))), json.load(open(os.path.join(run, "eval.json")))
    points = sum(r["points_per_step"] for r in records) / len(records)
    print(f"| {os.path.basename(run)} | {summary['steps']} | {points:,.0f} | {summary['steady_step_s']:.3f} | "
          f"{ev['psnr']:.2f} | {ev['background_opacity']:.4f} |")
PY
date -u >> "$out/provenance.txt"
