# hangar: the two commands a new user needs are `make demo` and `make test`.
SHELL := /bin/bash
VENV := .venv
PYTHON := $(VENV)/bin/python
APT_PACKAGES := qemu-system-x86 qemu-system-common qemu-utils mount skopeo umoci e2fsprogs busybox-static docker-registry cpio \
	kmod nftables ca-certificates python3-venv haproxy wrk nginx-light iproute2 gcc libc6-dev \
	etcd-server chromium tmux cmake g++ make runc
PYTEST_ARGS ?=
# make fuzz: schemathesis examples per API operation and pass (make test runs 5), and a time guard
FUZZ_EXAMPLES ?= 200
FUZZ_SECONDS ?= 3600
# gVisor's runsc (the sandbox tier): Debian trixie's build, kept here; tests and the demo use it
RUNSC := $(CURDIR)/.cache/runsc/bin/runsc

.PHONY: deps runsc venv bytecode demo test lint typecheck unit fuzz gpu-check bench-api bench-boot bench-placement \
	bench-proxy bench-volume bench-mixes bench-replay bench-tenancy bench-llm engine engine-background clean

deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null \
		| grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing: $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends $$missing; \
	fi

runsc: $(RUNSC)

$(RUNSC): scripts/fetch_runsc.sh
	./scripts/fetch_runsc.sh $(dir $(RUNSC))..
	touch $@

$(VENV)/.installed: pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

demo: deps runsc venv bytecode
	./scripts/demo.sh

lint: venv
	$(VENV)/bin/ruff check hangar tests scripts
	$(VENV)/bin/ruff format --check hangar tests scripts

typecheck: venv
	$(VENV)/bin/mypy

# `make test` runs the suite as two pytest processes at once: BESIDE_TESTS (schedulers, stores,
# the API and web app in process, pure unit tests, and the fleet's module, which boots few
# guests) beside the rest (guests under TCG, which keep one core busy and leave the other
# mostly idle). Every test makes its own names, ports, namespaces and homes, and the shared
# cache's entries are locked, so the two never meet. The second process's output follows the
# first's. With PYTEST_ARGS, one process runs them.
BESIDE_TESTS = tests/scheduler tests/model tests/devices tests/store tests/metrics tests/web \
	tests/api tests/fleet tests/proxy tests/net/test_addressing.py tests/net/test_dns.py \
	tests/images/test_reference.py tests/images/test_run_config.py tests/vmm/test_qemu_argv.py \
	tests/vmm/test_volume_argv.py tests/vmm/test_accel.py tests/vmm/test_gpu_topology.py \
	tests/llm/test_pool.py tests/agent/test_engine.py tests/test_settings.py tests/test_layers.py

unit: deps runsc venv bytecode
ifeq ($(strip $(PYTEST_ARGS)),)
	@log=$$(mktemp); \
	$(PYTHON) -m pytest -p no:cacheprovider $(BESIDE_TESTS) >"$$log" 2>&1 & quick=$$!; \
	status=0; \
	$(PYTHON) -m pytest $(addprefix --ignore=,$(BESIDE_TESTS)) || status=$$?; \
	wait $$quick || status=$$?; \
	echo "=== the tests run beside the others: $(BESIDE_TESTS)"; \
	cat "$$log"; rm -f "$$log"; \
	exit $$status
else
	$(PYTHON) -m pytest $(PYTEST_ARGS)
endif

# hangar's own modules compiled ahead (only what changed): every `hangar` process the suite and
# the demo start then loads bytecode instead of compiling ~200 modules, even where the
# environment sets PYTHONDONTWRITEBYTECODE (about 0.7 s off each server start here).
bytecode: venv
	$(PYTHON) -m compileall -q hangar

# The engine tests and the model deployment tests need llama-server, built once into the suite's
# cache. A cold build takes minutes, so `make test` starts it in the background first, at a lower
# priority: it overlaps lint, mypy and the tests that do not need it, and the tests that do wait
# for it (the cache entry is locked while it is built). Afterwards it is a cache lookup.
test: deps venv engine-background lint typecheck unit

engine-background: deps venv
	@mkdir -p "$${HANGAR_CACHE:-$(CURDIR)/.cache}"
	HANGAR_CACHE=$${HANGAR_CACHE:-$(CURDIR)/.cache} nohup nice -n 10 $(PYTHON) -m hangar.llm.engine \
		> "$${HANGAR_CACHE:-$(CURDIR)/.cache}/engine-build.log" 2>&1 &

fuzz: deps runsc venv
	$(PYTHON) -m pytest tests/api/test_fuzz.py -s --fuzz-examples=$(FUZZ_EXAMPLES) --fuzz-seconds=$(FUZZ_SECONDS) $(PYTEST_ARGS)

gpu-check: runsc venv
	$(PYTHON) scripts/gpu_check.py

# llama-server from the pinned llama-cpp-python sdist, built once into $HANGAR_CACHE (minutes)
engine: deps venv
	HANGAR_CACHE=$${HANGAR_CACHE:-$(CURDIR)/.cache} $(PYTHON) -m hangar.llm.engine

bench-api: deps venv
	$(VENV)/bin/hangar bench api

bench-boot: deps runsc venv
	HANGAR_RUNSC=$(RUNSC) $(VENV)/bin/hangar bench boot

bench-volume: deps venv
	$(VENV)/bin/hangar bench volume

bench-tenancy: deps venv
	$(VENV)/bin/hangar bench tenancy

bench-placement: venv
	$(VENV)/bin/hangar bench placement --nodes ../shared/data/alibaba-gpu-v2023/openb_node_list_gpu_node.csv \
		--pods ../shared/data/alibaba-gpu-v2023/openb_pod_list_default.csv --seeds 42..51

bench-llm: deps venv engine
	HANGAR_CACHE=$${HANGAR_CACHE:-$(CURDIR)/.cache} $(VENV)/bin/hangar bench llm

TRACE := ../shared/data/alibaba-gpu-v2023
# hangar against FGD and BestFit on every kind of mix (15 mixes x 10 seeds; long on 2 cores)
bench-mixes: venv
	$(VENV)/bin/hangar bench mixes --data $(TRACE) --seeds 42..51 --jobs 2

# the trace with arrivals and departures: Fly-style whole GPUs against hangar's slices and shares
bench-replay: venv
	$(VENV)/bin/hangar bench replay --data $(TRACE) --seeds 42..44

bench-proxy: deps venv
	$(VENV)/bin/hangar bench proxy

clean:
	rm -rf $(VENV) .cache .pytest_cache .mypy_cache .ruff_cache
