#!/bin/bash
# BitNeRF's speed and file size against NeRF's on this CPU, at the commit checked out: docs/results.md's speed and size tables.
#   bash studies/bitnerf_speed.sh [OUT]      (default runs/bitnerf_speed; about 5 minutes)
# One thread per benchmark (set CORE to pin them to one core, e.g. CORE=1 while a study runs on core 0). Each bench
# pairs BitNeRF with NeRF of the same size in one process, alternately, and reports the median of the pairs.
. "$(dirname "$0")/script_setup.sh" "${1:-runs/bitnerf_speed}"
ratio=(bench.py --ratio --ratio-sizes cpu,exp4 --compile both --threads 1)
# training: the default backward (auto: bf16 on a CPU with bf16 units), then the float32 one
"${pin[@]}" "$py" "${ratio[@]}" --amp off --repeats 11 > "$out/train.txt"
"${pin[@]}" "$py" "${ratio[@]}" --amp off --repeats 11 --bitnet-grad fp32 > "$out/train_fp32.txt"
# rendering: the packed .bitnerf model's points/s over NeRF's
"${pin[@]}" "$py" "${ratio[@]}" --render --repeats 9 > "$out/render.txt"
# what a CPU without int8 dot-product units gets: the float product of the same integers
NERF_INT_MM=off "${pin[@]}" "$py" "${ratio[@]}" --amp off --repeats 11 > "$out/train_float_product.txt"
NERF_INT_MM=off "${pin[@]}" "$py" "${ratio[@]}" --render --repeats 9 > "$out/render_float_product.txt"
# the packed file at both scales and both widths, after one training step on lego (the grid carved from the views)
for exp in exp4 exp7; do
  for scale in cpu paper; do
    run="$out/$exp-$scale"
    "${pin[@]}" "$py" "$exp.py" --scale=$scale --steps=1 --data=data/lego100.npz --val_views=10 --compile=false \
      --video=false --wandb=disabled --out_dir="$run" > "$run.log" 2>&1
    "${pin[@]}" "$py" export.py --ckpt "$run/ckpt.pt" > "$out/export-$exp-$scale.txt"
  done
done
date -u >> "$out/provenance.txt"
