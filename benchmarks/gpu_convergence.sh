#!/usr/bin/env bash
# G2P models trained long on one GPU, all at once: the 60-minute preset over three seeds, and
# one run per variant of the claims experiments (norm, depth, rnn, sampling; `encdec
# experiment` trains the same variants one after another). A g2p-small step leaves a large GPU
# mostly idle, so the runs share it, each in its own process with one CPU thread.
#
#   benchmarks/gpu_convergence.sh OUT_DIR [MINUTES]
#
# Every model is an `encdec sweep` (so each has its table in OUT_DIR/NAME/results.md), trained
# MINUTES (default 6) with the GPU settings below: 8,192-token batches, a 400-step warm-up and
# a cosine decay over the last 30 % of the time budget. The preset is scored with its beam 5,
# the claims' variants greedy (as `encdec experiment` scores them) and then with beam 5.
# DEADLINE (seconds, default none) stops waiting for the runs and writes the summary with what
# has finished. ENCDEC names the command (default `encdec`), DEVICE the device (default cuda).
set -u
out=${1:?usage: benchmarks/gpu_convergence.sh OUT_DIR [MINUTES]}
minutes=${2:-6}
encdec=${ENCDEC:-encdec}
device=${DEVICE:-cuda}
deadline=${DEADLINE:-0}
mkdir -p "$out"
start=$SECONDS

long="train.device=$device train.num_threads=1 train.max_tokens=8192 train.warmup_steps=400
      train.schedule=cosine train.decay_fraction=0.3 train.valid_every=1000
      train.valid_max_inputs=2000 decode.batch_size=512"
# shellcheck disable=SC2086
sweep() {  # NAME CONFIG [OVERRIDES...] [SWEEP OPTIONS...]
    local name=$1 config=$2
    shift 2
    $encdec sweep "$config" $long "$@" --minutes "$minutes" --out "$out/$name" \
        >"$out/$name.log" 2>&1
    echo "$name: sweep exit $?" >>"$out/status.txt"
}

small=configs/g2p-small.yaml
# the preset as the README's figures measured it, with its earlier dropout 0.1
sweep preset configs/g2p-small-60min.yaml model.dropout=0.1 --seeds 1,2,3 --jobs 3 &
sweep pre-LN $small --method greedy &
sweep post-LN $small model.norm=post --method greedy &
sweep pre-BatchNorm $small model.norm_type=batchnorm --method greedy &
# depth at equal parameters: the widths `encdec experiment depth` matches to g2p-small
sweep deep-thin-6x6 $small model.enc_layers=6 model.dec_layers=6 model.d_model=184 \
    model.ffn_dim=736 --method greedy &
sweep shallow-wide-2x2 $small model.enc_layers=2 model.dec_layers=2 model.d_model=312 \
    model.ffn_dim=1248 --method greedy &
sweep lstm $small model.arch=lstm model.enc_layers=2 model.dec_layers=2 model.d_model=386 \
    model.ffn_dim=1544 model.rnn_attention=luong --method greedy &
# scheduled sampling from scratch, inverse sigmoid capped at 0.25 (as `encdec experiment
# sampling`, k set for the cap reached near step 2,600)
sweep scheduled-sampling $small train.scheduled_sampling=inverse_sigmoid train.ss_k=507 \
    train.ss_max_prob=0.25 --method greedy &

if command -v nvidia-smi >/dev/null; then
    sleep 90
    nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv >"$out/gpu-load.txt" 2>&1
    nvidia-smi dmon -c 10 >>"$out/gpu-load.txt" 2>&1
fi

waited() {  # true while sweeps run and the deadline (if any) is not reached
    [ -n "$(jobs -rp)" ] && { [ "$deadline" = 0 ] || [ $((SECONDS - start)) -lt "$deadline" ]; }
}
while waited; do sleep 5; done

# the claims' variants with beam 5 too, where time is left
if [ "$deadline" = 0 ] || [ $((SECONDS - start)) -lt $((deadline - 60)) ]; then
    for run in "$out"/*/base/seed-1; do
        case $run in "$out"/preset/*) continue ;; esac
        [ -e "$run/checkpoints/best" ] || continue
        $encdec evaluate "$run" --split test --beam 5 --device "$device" --batch-size 512 \
            >"$run/../../beam5.log" 2>&1 &
    done
    while waited; do sleep 5; done
fi

{
    echo "elapsed $((SECONDS - start)) s"
    cat "$out/status.txt" 2>/dev/null
    for table in "$out"/*/results.md; do echo "## $table"; grep '^|' "$table"; done
    for log in "$out"/*/beam5.log; do echo "## $log"; grep -i "wer" "$log" | tail -2; done
} | tee "$out/summary.txt"
