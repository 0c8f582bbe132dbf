# `make demo` and `make test` create .venv on first use and install into it.
#
# TORCH_PINS is the torch/torchvision pair installed first. The default is the pair that is
# known to work on the reference machine (Python 3.11, torch 2.14.1). Elsewhere use any
# matching pair >= 2.11, e.g. `make test TORCH_PINS="torch==2.11.0 torchvision==0.26.0"`,
# or `make test TORCH_PINS=` to keep whatever pyproject.toml's ranges resolve to.
#
# TORCH_INDEX, if set, is the package index TORCH_PINS come from: PyPI's Linux torch wheels
# carry the CUDA libraries (4.1 of the 5.6 GB installed); on a machine without a GPU,
# `make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu` installs PyTorch's CPU-only
# build instead. pip shows its progress: the first install downloads gigabytes.
PYTHON     ?= python3
VENV       ?= .venv
BIN        := $(VENV)/bin
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
TORCH_INDEX ?=
NPROC      ?= 2
STAMP      := $(VENV)/.installed

.PHONY: demo gpt test test-slow test-long test-all test-oracles test-fakegpu bench model bench-topology \
  bench-compress bench-compress-gpt bench-diloco bench-fault-tolerance torture-fault-tolerance \
  stress-exit torture-async bench-async-save lint docs clean

# Installs pyproject.toml's dependencies (and the dev extra) without installing the repo
# itself: the scripts run from the checkout, as `python train_ddp.py` or `-m study.bench`.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(if $(and $(TORCH_INDEX),$(TORCH_PINS)),$(BIN)/python -m pip install \
	  --disable-pip-version-check --progress-bar on --index-url $(TORCH_INDEX) $(TORCH_PINS))
	$(BIN)/python -m pip install --disable-pip-version-check --progress-bar on $(TORCH_PINS) \
	  $$($(BIN)/python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print(' '.join(p['dependencies'] + p['optional-dependencies']['dev']))")
	touch $(STAMP)

demo: $(STAMP)
	launch/cpu_sim.sh $(NPROC) --epochs 3 --out-dir runs/demo --overwrite

# The small GPT (training/gpt.py) learning this Python's standard library on NPROC CPU
# processes, minutes: its loss every 25 steps, then 300 bytes it writes (README, "A small
# GPT on real text"). The recipe of benchmarks/learning_gpt.py (RECIPE), which checks the
# eval loss against the corpus's unigram entropy.
GPT_FLAGS := --model gpt --dataset stdlib --optimizer adamw --lr 3e-3 --warmup-steps 30 \
  --lr-schedule cosine --batch-size 16 --max-steps 600 --eval-size 256 --log-every 25 --sample 300
gpt: $(STAMP)
	launch/cpu_sim.sh $(NPROC) $(GPT_FLAGS) --out-dir runs/gpt --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

# CI's: the slow tests but the long ones. `make test-long`: those, by hand (about 16 minutes on
# the 2-core box): sweeps, repeated trials, and the docs walk's commands whose program an
# earlier command of the walk already ran (tests/test_docs_commands.py, in_ci).
test-slow: $(STAMP)
	$(BIN)/python -m pytest -m "slow and not long" --durations=20 || [ $$? -eq 5 ]  # 5: none

test-long: $(STAMP)
	$(BIN)/python -m pytest -m long || [ $$? -eq 5 ]

test-all: $(STAMP)
	$(BIN)/python -m pytest

# The oracle tests once more under the portable kernels: another CPU picks other SIMD kernels
# (ATEN_CPU_CAPABILITY=default|avx2|avx512), and a verdict that changes with them would not be
# an oracle. `make test-oracles CAPABILITY=avx2` for another choice.
CAPABILITY ?= default
test-oracles: $(STAMP)
	ATEN_CPU_CAPABILITY=$(CAPABILITY) $(BIN)/python -m pytest -m "oracle and not slow"

# The default suite on a CPU machine that pretends to have 2 GPUs (tests/fakegpu): it fails
# if a test not marked `gpu` would have used a GPU on a real GPU host.
test-fakegpu: $(STAMP)
	FAKE_GPUS=2 PYTHONPATH=$(CURDIR)/tests/fakegpu$${PYTHONPATH:+:$$PYTHONPATH} \
	  $(BIN)/python -m pytest -m "not slow and not gpu"

# Each writes a table to stdout and a CSV and a PNG plot to bench_out/. Timings on a shared
# machine are noisy: read them as the ratios within one run. Each fits itself to the machine:
# bench_sync and study.bench run one NCCL rank per GPU with 2 or more GPUs, else 2 gloo ranks
# on CPU; bench_dp_ddp uses every GPU, or 2 CPU workers. `make bench NPROC=4`: 4 of them.
BENCH_NPROC := $(if $(filter file undefined,$(origin NPROC)),,--nproc $(NPROC))
#
# Then the same evidence on the small GPT (training/gpt.py at `make gpt`'s sizes: 4 blocks of
# width 128, context 128, 0.84 M parameters, 3.4 MB of float32 gradients) on windows of this
# Python's standard library, into bench_out/gpt/: the sync modes' step time, ZeRO's bytes per
# parameter and peak per rank, compression's bytes and time per synchronisation, eager
# against compiled, and the overlap timeline of a traced train_ddp.py run. 6 minutes on the
# 2-core box at load average 11 with inductor's cache holding the gpt's kernels, 2 more
# without. --bucket-cap-mb 1: DDP's default buckets hold these gradients in 2 (1 MiB, then
# 2.3 MB that only the end of backward fills); 1 MiB buckets make 4, a block and a third
# each, and leave only the embeddings (0.2 MB) for the end, so that overlap has buckets to
# send while backward goes on (tests/test_benchmarks_gpt.py checks the plan).
GPT_BENCH := --model gpt --dataset stdlib --batch-size 4
GPT_TIMELINE := train_ddp.py --model gpt --dataset stdlib --batch-size 4 --max-steps 12 \
  --eval-size 64 --log-every 1000 --trace-comm --out-dir bench_out/gpt/timeline --overwrite
bench: $(STAMP)
	$(BIN)/python -m benchmarks.bench_sync --out-dir bench_out $(BENCH_NPROC)
	$(BIN)/python -m benchmarks.bench_dp_ddp --out-dir bench_out $(BENCH_NPROC)
	$(BIN)/python -m study.bench --out-dir bench_out $(BENCH_NPROC)
	$(BIN)/python -m benchmarks.bench_zero --out-dir bench_out $(BENCH_NPROC)
	$(BIN)/python -m benchmarks.bench_goals --out-dir bench_out $(BENCH_NPROC)
	$(BIN)/python -m benchmarks.bench_sync $(GPT_BENCH) --bucket-cap-mb 1 --rounds 3 --steps 5 \
	  --out-dir bench_out/gpt $(BENCH_NPROC)
	$(BIN)/python -m benchmarks.bench_zero $(GPT_BENCH) --rounds 3 --steps 3 --out-dir bench_out/gpt \
	  $(BENCH_NPROC)
	$(BIN)/python -m benchmarks.bench_compress_sync --models cnn,gpt $(BENCH_NPROC)
	$(BIN)/python -m benchmarks.bench_compile $(GPT_BENCH) --bucket-cap-mb 1 --modes ddp overlap \
	  $(BENCH_NPROC)
	OMP_NUM_THREADS=1 $(BIN)/torchrun --standalone --nproc-per-node $(NPROC) $(GPT_TIMELINE) \
	  > bench_out/gpt/timeline.log
	$(BIN)/python -m study.timeline bench_out/gpt/timeline

# The alpha-beta cost model against this machine (docs/cost-model.md): a 4-rank sweep of gloo's
# all_reduce and the hand-made ring/tree/rhd/naive, their fits, whether the formulas pick the
# fastest algorithm; traced `--sync allreduce` runs on 2 and 4 ranks against the model (with
# a 2-rank sweep of all_reduce to fit); the extrapolation to 8..1024 ranks on an assumed
# datacentre link, and its plot. About six minutes on a loaded 2-core box.
MODEL_OUT ?= bench_out/model
MODEL_OPS := all_reduce ring_all_reduce tree_all_reduce rhd_all_reduce naive_all_reduce
MODEL_SWEEP := --min-bytes 1K --max-bytes 16M --step-factor 2 --warmup 5 --iters 40
MODEL_TRAIN := train_ddp.py --sync allreduce --model mlp --epochs 1 --max-steps 40 --no-eval \
  --log-every 1000 --trace-comm --overwrite
model: $(STAMP)
	$(BIN)/python -m study.bench --nproc 4 --ops $(MODEL_OPS) $(MODEL_SWEEP) --out-dir $(MODEL_OUT)/w4
	$(BIN)/python -m study.cost_model fit $(MODEL_OUT)/w4/bench.csv
	$(BIN)/python -m study.cost_model pick $(MODEL_OUT)/w4/bench.csv --world 4
	$(BIN)/python -m study.bench --nproc 2 --ops all_reduce $(MODEL_SWEEP) --out-dir $(MODEL_OUT)/w2
	for w in 2 4; do OMP_NUM_THREADS=1 $(BIN)/torchrun --standalone --nproc-per-node $$w \
	  $(MODEL_TRAIN) --out-dir $(MODEL_OUT)/ddp-w$$w > $(MODEL_OUT)/ddp-w$$w.log || exit 1; \
	  $(BIN)/python -m study.cost_model ddp $(MODEL_OUT)/w$$w/bench.csv $(MODEL_OUT)/ddp-w$$w || exit 1; done
	$(BIN)/python -m study.cost_model extrapolate --plot $(MODEL_OUT)/cost-model.png

# Hierarchical vs flat all-reduce on 4 CPU ranks as 2 nodes x 2, the inter-node link emulated
# at 1, 10 and 100 Gbit/s (docs/topology.md): a table on stdout, bench_out/bench_topology.csv.
bench-topology: $(STAMP)
	$(BIN)/python -m benchmarks.bench_topology --out-dir bench_out

# docs/compression.md's table: one epoch of train_ddp.py per compression mode (torch's DDP comm
# hooks and the hand-made --compress), NPROC ranks on CPU, one run after the other.
bench-compress: $(STAMP)
	$(BIN)/python -m benchmarks.bench_compress --out-dir bench_out $(BENCH_NPROC)

# The same on the small GPT (docs/compression.md): 100 steps of `make gpt`'s model on the
# standard library per row, eval loss on 256 held-out windows, into bench_out/gpt/ (4 minutes
# at load average 9). Not ddp+powersgd: torch's PowerSGD hook over the gpt's two DDP buckets
# stops at a collective mismatch on gloo.
COMPRESS_GPT := --model gpt --dataset stdlib --batch-size 4 --max-steps 100 --eval-size 256 \
  --log-every 1000
bench-compress-gpt: $(STAMP)
	$(BIN)/python -m benchmarks.bench_compress --ranks 1 --out-dir bench_out/gpt $(BENCH_NPROC) \
	  --modes ddp,ddp+bf16,allreduce,allreduce+bf16,allreduce+powersgd-r1 -- $(COMPRESS_GPT)

# Loss against bytes sent (docs/communication-at-scale.md): ddp, local SGD, DiLoCo, DiLoCo with a
# bfloat16 outer all-reduce and streaming DiLoCo, each a traced train_ddp.py run of the small GPT
# on the standard library, NPROC ranks on CPU, one after the other (about 3 minutes loaded):
# bench_out/gpt/bench_diloco.{csv,png} and the curves in bench_diloco_curves.csv.
DILOCO_GPT := --model gpt --dataset stdlib --batch-size 4 --eval-size 256 --log-every 10
bench-diloco: $(STAMP)
	$(BIN)/python -m benchmarks.bench_diloco --steps 160 --every 8 --out-dir bench_out/gpt \
	  $(BENCH_NPROC) -- $(DILOCO_GPT)
# docs/fault-tolerance.md's figures: one worker SIGKILLed mid-run, the fault-tolerant job
# (coordinator + 3 replicas) against torchrun's restart path; steps lost and seconds from the
# kill to the next step, TRIALS times each. About 1.5 minutes a trial on a loaded 2-core box.
TRIALS ?= 1
bench-fault-tolerance: $(STAMP)
	$(BIN)/python -m benchmarks.bench_fault_tolerance --out-dir bench_out --trials $(TRIALS)

# The fault-tolerant job tortured ROUNDS times per scenario (tests/test_training_fault_tolerant.py):
# a random replica SIGKILLed at a random moment and replaced, a source killed while it heals a
# newcomer, two of three lost at once (one error line). Prints the counts; about 40 s a round.
ROUNDS ?= 5
torture-fault-tolerance: $(STAMP)
	TORTURE_ROUNDS=$(ROUNDS) $(BIN)/python -m pytest -s -m slow -k test_torture \
	  tests/test_training_fault_tolerant.py

# Every torchrun script of the repository (the pitfalls in both modes, train_ddp.py in each
# --sync mode) RUNS times, two at once so the machine is loaded: any abort at exit, wrong exit
# status or timeout fails it (see benchmarks/stress_exit.py). Long: `make stress-exit RUNS=5`
# for a quick look.
RUNS ?= 50
stress-exit: $(STAMP)
	$(BIN)/python -m benchmarks.stress_exit --runs $(RUNS)

# docs/checkpoints.md's --async-save table: resnet18 with AdamW (a 134 MB checkpoint) trained
# with no checkpoints, synchronous saves and --async-save; about two minutes on a loaded box.
bench-async-save: $(STAMP)
	$(BIN)/python -m benchmarks.bench_async_save --out-dir bench_out

# --async-save under SIGKILL (tests/test_training_checkpoint_background.py): KILLS kills per
# mode (ddp, zero2; by turns the whole job, rank 0, rank 1) at random moments of a background
# write, each followed by the checks and an exact resume; prints the counts at the end.
# TORTURE_SEED replays a run's choices (the seed is printed). About 15 s a kill on a loaded box.
KILLS ?= 10
torture-async: $(STAMP)
	ASYNC_TORTURE_KILLS=$(KILLS) $(if $(TORTURE_SEED),ASYNC_TORTURE_SEED=$(TORTURE_SEED)) \
	  $(BIN)/python -m pytest -q -s -m slow tests/test_training_checkpoint_background.py \
	  -k kills

# The figures the pages quote that the code recomputes in seconds (the pair's diff counts, the
# pitfalls' RESULT lines), rewritten between their <!-- figure: NAME --> markers; `make test`
# fails while one is stale (tests/test_docs_figures.py). Timings are not among them.
docs: $(STAMP)
	$(BIN)/python -m tests.doc_figures --write

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	@if command -v shellcheck >/dev/null; then shellcheck launch/*.sh launch/slurm.sbatch; \
	else echo "shellcheck not installed (apt-get install shellcheck): launch/ scripts not checked"; fi

clean:
	rm -rf runs bench_out .pytest_cache
