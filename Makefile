# kdshards: `make help` lists the targets.

VENV        ?= .venv
PYTHON      ?= $(VENV)/bin/python
RUFF        ?= $(VENV)/bin/ruff
PYTHON_BOOT ?= python3.11
MODELS_DIR  ?= models
PYTEST_ARGS ?=

SETUP_STAMP := $(VENV)/.setup-stamp

.DEFAULT_GOAL := help
.PHONY: help setup test lint format models bench-shards demo clean-models train

help: ## list the targets
	@echo "kdshards make targets:"
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  %-14s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo "variables: PYTEST_ARGS='...' (extra pytest args), KDSHARDS_DEVICE=cpu|gpu (setup)"
	@echo "  train: METHOD BETA ALPHA TEMP STEPS SHARDS STUDENT RUN GPUS ZERO ARGS"

setup: $(SETUP_STAMP) ## create .venv and install everything (cpu or gpu, auto-detected)

# Redone only when the dependencies or the install script change.
$(SETUP_STAMP): pyproject.toml tools/setup.sh
	PYTHON_BOOT=$(PYTHON_BOOT) bash tools/setup.sh $(VENV)
	@touch $@

test: setup ## run the test suite (PYTEST_ARGS passed through)
	$(PYTHON) -m pytest $(PYTEST_ARGS)

lint: setup ## ruff check + format check
	$(RUFF) check .
	$(RUFF) format --check .

format: setup ## ruff format + autofix lint findings
	$(RUFF) format .
	$(RUFF) check --fix .

models: setup ## convert SmolLM2-135M-Instruct into models/ (teacher + student)
	$(PYTHON) -m tools.models --out $(MODELS_DIR)

clean-models: ## delete the converted models
	rm -rf $(MODELS_DIR)

bench-shards: setup models ## benchmark shard writing/reading
	$(PYTHON) -m tools.bench_shards

# make train METHOD=skd|seqkd|jsd|dualkl [BETA= ALPHA= TEMP= STEPS= SHARDS= STUDENT= RUN=]
#            [GPUS=n] [ZERO=2|3] [ARGS='key=value ...']
METHOD ?= skd
GPUS   ?= 1
TRAIN_OVERRIDES = $(if $(BETA),loss.beta=$(BETA)) $(if $(ALPHA),loss.alpha=$(ALPHA)) \
	$(if $(TEMP),loss.temperature=$(TEMP)) $(if $(STEPS),max_steps=$(STEPS)) \
	$(if $(SHARDS),data.shards=$(SHARDS)) $(if $(STUDENT),model.path=$(STUDENT)) \
	$(if $(RUN),out_dir=$(RUN)) $(if $(ZERO),deepspeed=configs/deepspeed/zero$(ZERO).json) $(ARGS)
# One process runs as is; several go through torchrun (DDP, or DeepSpeed with ZERO=).
TRAIN_LAUNCH = $(if $(filter 1,$(GPUS)),$(PYTHON) -m,$(VENV)/bin/torchrun --nproc_per_node $(GPUS) -m)

train: setup ## train the student from shards (METHOD=skd|seqkd|jsd|dualkl, see configs/train)
	$(TRAIN_LAUNCH) train configs/train/$(METHOD).yaml $(TRAIN_OVERRIDES)

demo: setup models ## end-to-end demo: precompute with the teacher, train the student
	$(PYTHON) -m tools.demo
