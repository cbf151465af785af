# Two entry points (see README):
#   make demo   set up a virtualenv and run the whole pipeline offline on tiny
#               random models and generated DIV2K-shaped images; prints each
#               stage's summary
#   make test   the full test suite (what CI runs)
#
# TORCH picks the torch build installed before the project: the default is the
# CPU wheel this project's machines carry; on a GPU box use e.g. TORCH=torch.

PYTHON ?= python3
# extras the tests exercise: serve (transformers serve), ray (a local Ray
# cluster), browser (playwright,
# driving Debian's chromium)
EXTRAS ?= dev,serve,browser,ray
VENV   ?= .venv
TORCH  ?= torch==2.13.0
DEMO   ?= runs/demo
DP      = $(VENV)/bin/dataprep
SR      = $(VENV)/bin/softrepa
# written by `dataprep tiny-models` (`softrepa tiny-models` adds the SD pipelines
# and official-format token files): DIV2K-shaped frames + their editing pairs
SAMPLES = $(DEMO)/models/div2k
# offline, and quiet about the tiny models' random-token prompts being truncated
OFFLINE = HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error DIFFUSERS_VERBOSITY=error HF_HUB_DISABLE_PROGRESS_BARS=1

.PHONY: demo test install clean-demo browser

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q "$(TORCH)"
	$(VENV)/bin/python -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

demo: install
	rm -rf $(DEMO)
	$(OFFLINE) $(DP) tiny-models $(DEMO)/models
	$(OFFLINE) $(SR) tiny-models $(DEMO)/models
	$(OFFLINE) $(DP) caption div2k --data $(SAMPLES) --out $(DEMO) --model $(DEMO)/models/llava --max-new-tokens 48
	$(OFFLINE) $(DP) caption folder $(DEMO)/models/images --name generated --out $(DEMO) --model $(DEMO)/models/llava --max-new-tokens 48
	$(OFFLINE) $(DP) rewrite --out $(DEMO) --model $(DEMO)/models/llama --max-new-tokens 64
	$(DP) check $(SAMPLES)/prompts_editing.json
	$(DP) batches --preset sd3 --captions $(DEMO)/captions --edits $(DEMO)/edits --out $(DEMO)/batches --epochs 2
	# tiny random Llama output never passes the checker: --include-failed only so the demo exports something
	$(DP) export softrepa $(DEMO)/exports/softrepa --run $(DEMO) --include-failed
	$(DP) export piebench $(DEMO)/exports/piebench --run $(DEMO) --include-failed
	$(OFFLINE) $(SR) train --preset sd3 --batches $(DEMO)/batches --model $(DEMO)/models/sd3 --out $(DEMO)/train-sd3 --steps 3 --checkpoint-every 2 \
	  --resolution native --best-by none  # tiny SD3 is 32 px; 14 images are too few to hold 50 out for the CLIP pick
	$(SR) import-tokens $(DEMO)/models/official-tokens/sd3 $(DEMO)/tokens-official-sd3 --backbone sd3
	$(OFFLINE) $(SR) evaluate-edit --pairs $(SAMPLES)/prompts_editing.json --model $(DEMO)/models/sd3 --tokens $(DEMO)/train-sd3/tokens \
	  --out $(DEMO)/eval-edit --steps 6 --n-max 4 --tgt-cfg 9,13 --size 32 --device cpu --tiny-metrics
	$(DP) report $(DEMO)
	$(DP) stats $(DEMO)

test: install browser
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest -q

clean-demo:
	rm -rf $(DEMO)

# The report and grid tests drive Debian's chromium through playwright (which
# never downloads a browser here: it is given /usr/bin/chromium). apt needs
# root; without it (and without chromium) those tests skip, saying why.
browser: install
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; } \
	  || echo "note: chromium is not installed and apt needs root: the browser tests will skip"

