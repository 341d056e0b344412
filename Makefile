# make demo | make test | make zoo | make bench | make fuzz — each sets itself up from nothing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
BENCH_INSTALLED := $(VENV)/.installed-bench
ZOO_INSTALLED := $(VENV)/.installed-zoo
DEMO := build/demo

.PHONY: demo test zoo bench fuzz install clean

install: $(INSTALLED)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(INSTALLED): $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

demo: $(INSTALLED)
	@rm -rf $(DEMO) && mkdir -p $(DEMO)  # outputs are never overwritten silently: start clean
	@echo "== redundancy in a digits MLP that was widened 16-12 -> 48-36 by function-preserving embeddings"
	$(BIN)/keras-embed analyze saved_models/digits_widened.keras
	@echo "== prune it, verified on held-out digits"
	$(BIN)/keras-embed prune saved_models/digits_widened.keras -o $(DEMO)/digits_pruned.keras \
		--data saved_models/digits_heldout.npz --report $(DEMO)/report.json
	@echo "== compare with the narrow network it was grown from"
	$(BIN)/python saved_models/compare.py saved_models/digits_narrow.keras $(DEMO)/digits_pruned.keras \
		--data saved_models/digits_heldout.npz
	@echo "== critical lifting: insert relu layers that are the identity on the digits data, then prune them away"
	$(BIN)/keras-embed embed saved_models/digits_narrow.keras -o $(DEMO)/digits_lifted.keras \
		--deepen hidden_relu --deepen hidden_tanh --dataset digits
	$(BIN)/keras-embed prune $(DEMO)/digits_lifted.keras -o $(DEMO)/digits_unlifted.keras \
		--dataset digits --validation saved_models/digits_heldout.npz
	@echo "== a residual CNN whose channels were split (both branches of its Add at once): prune it back"
	$(BIN)/keras-embed prune saved_models/digits_cnn_widened.keras -o $(DEMO)/digits_cnn_pruned.keras
	$(BIN)/python saved_models/compare.py saved_models/digits_cnn.keras $(DEMO)/digits_cnn_pruned.keras \
		--data saved_models/digits_images_heldout.npz
	@echo "== the widened CNN with every weight moved by 1e-3 noise: no exact copies left, exact pruning removes little;"
	@echo "   --mode data finds the near copies, calibrated on the training images; the drop's 95% upper confidence"
	@echo "   bound on the 297 held-out images is within 2 points (none can be certified closer than 1.23 on so few rows)"
	$(BIN)/keras-embed prune saved_models/digits_cnn_perturbed.keras -o $(DEMO)/digits_cnn_perturbed_data.keras \
		--mode data --max-accuracy-drop 2 --data saved_models/digits_images_train.npz \
		--validation saved_models/digits_images_heldout.npz
	@echo "== lift the CNN (an identity 1x1 relu convolution after res_a), then prune the lift away"
	$(BIN)/keras-embed embed saved_models/digits_cnn.keras -o $(DEMO)/digits_cnn_lifted.keras \
		--deepen res_a --data saved_models/digits_images_heldout.npz
	$(BIN)/keras-embed prune $(DEMO)/digits_cnn_lifted.keras -o $(DEMO)/digits_cnn_unlifted.keras \
		--data saved_models/digits_images_heldout.npz
	@echo "== a keras.applications model: MobileNetV2 (alpha 0.35) trained 4 epochs on digits enlarged to 32x32 RGB"
	$(BIN)/python saved_models/make_zoo_example.py $(DEMO)
	@echo "   widened on three channel groups by embed, then pruned back (BatchNormalization folds on the way)"
	$(BIN)/keras-embed embed $(DEMO)/mobilenetv2.keras -o $(DEMO)/mobilenetv2_widened.keras \
		--widen Conv1:0:0.3 --widen block_6_project:1:-0.5 --widen Conv_1:2:0.7
	$(BIN)/keras-embed prune $(DEMO)/mobilenetv2_widened.keras -o $(DEMO)/mobilenetv2_back.keras \
		--data $(DEMO)/mobilenetv2_digits.npz
	$(BIN)/python saved_models/compare.py $(DEMO)/mobilenetv2.keras $(DEMO)/mobilenetv2_back.keras \
		--data $(DEMO)/mobilenetv2_digits.npz
	@echo "   --mode data keeping half of every channel group, refit by least squares on 288 of the 360 digits and judged"
	@echo "   on the other 72 (seeded): so few rows cannot fit 640 channels well, and the report and stderr say so"
	$(BIN)/keras-embed prune $(DEMO)/mobilenetv2.keras -o $(DEMO)/mobilenetv2_half.keras --mode data --keep-ratio 0.5 \
		--data $(DEMO)/mobilenetv2_digits.npz

test: $(INSTALLED)
	$(BIN)/python -m pytest -q -p no:cacheprovider -n 2 tests

# every keras.applications architecture through the CLI (tests/test_zoo.py) and read back from its model.export()
# graph (tests/test_savedmodel_zoo.py): the tests marked zoo, which `make test` skips; then the speed and memory
# of analyze / exact prune on ResNet50 at 224x224 against its own predict (benchmarks/ZOO.md says how to read it).
# keras-hub (the `hub` extra) builds the backbones whose custom blocks must be refused by name.
$(ZOO_INSTALLED): $(INSTALLED)
	$(BIN)/python -m pip install --quiet -e '.[test,hub]'
	touch $@

zoo: $(ZOO_INSTALLED)
	$(BIN)/python -m pytest -q -p no:cacheprovider -n 2 tests -m zoo
	TF_CPP_MIN_LOG_LEVEL=3 $(BIN)/python benchmarks/bench_zoo_speed.py --size 224 --models ResNet50 --steps analyze,exact

# tensorflow-model-optimization and tf_keras (the `bench` extra) serve only benchmarks/tfmot_baseline.py,
# which bench_compression.py runs in its own process.
$(BENCH_INSTALLED): $(INSTALLED)
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	touch $@

bench: $(BENCH_INSTALLED)
	TF_CPP_MIN_LOG_LEVEL=3 $(BIN)/python benchmarks/bench_stats.py
	TF_CPP_MIN_LOG_LEVEL=3 $(BIN)/python benchmarks/bench_stream.py
	TF_CPP_MIN_LOG_LEVEL=3 $(BIN)/python benchmarks/bench_compression.py
	TF_CPP_MIN_LOG_LEVEL=3 $(BIN)/python benchmarks/bench_callbacks.py
	TF_CPP_MIN_LOG_LEVEL=3 $(BIN)/python benchmarks/bench_transformer.py
	TF_CPP_MIN_LOG_LEVEL=3 $(BIN)/python benchmarks/bench_latency.py --size 96
	TF_CPP_MIN_LOG_LEVEL=3 $(BIN)/python benchmarks/bench_scale.py
	TF_CPP_MIN_LOG_LEVEL=3 $(BIN)/python benchmarks/bench_allocation.py
	TF_CPP_MIN_LOG_LEVEL=3 $(BIN)/python benchmarks/bench_skeptic.py
	TF_CPP_MIN_LOG_LEVEL=3 $(BIN)/python benchmarks/bench_landscape.py

# 2,000 examples per property (about 2 h of CPU): pytest-xdist spreads the properties over the cores.
fuzz: $(INSTALLED)
	KERAS_EMBED_FUZZ_EXAMPLES=2000 $(BIN)/python -m pytest -q -p no:cacheprovider -n auto tests -k property

clean:
	rm -rf $(VENV) build *.egg-info
