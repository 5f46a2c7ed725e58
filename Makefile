# ds4 build. `make` builds the CPU programs into the repo root; `make test`
# builds and runs every test that needs no model and no GPU; `make cuda`
# builds the same programs with the CUDA backend (objects in build/cuda/,
# needs nvcc) and `make test-cuda` runs the GPU tests. Objects live under
# $(BUILD) (build/ by default). Sources are discovered by directory, so a
# new file needs no edit here.

CC       ?= cc
NVCC     ?= nvcc
CUDA_ARCH ?= sm_90a
BUILD    ?= build
OPT      ?= -O2
# -ffp-contract=off: the quantizers must not fuse multiply-adds (byte-exact
# output against ggml/gguf-py), and the CPU reference stays plain IEEE.
CFLAGS   += -std=c11 $(OPT) -g -Wall -Wextra -fPIC -ffp-contract=off \
            -D_GNU_SOURCE -Isrc -MMD -MP
ifeq ($(CI),true)
CFLAGS   += -Werror
endif
LDLIBS   += -lpcre2-8 -ljansson -lmicrohttpd -ledit -lcrypto -lpthread -lm
SAN      := -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined

LIB_SRC  := $(sort $(wildcard src/*.c src/util/*.c src/cpu/*.c))
LIB_OBJ  := $(LIB_SRC:%.c=$(BUILD)/%.o)
ASAN_OBJ := $(LIB_SRC:%.c=build/asan/%.o)
CUDA_SRC := $(sort $(wildcard src/cuda/*.cu))
CUDA_HOME ?= $(patsubst %/bin/nvcc,%,$(shell command -v $(NVCC) 2>/dev/null))
CUDA_LIBS := -L$(CUDA_HOME)/lib64 -lcudart_static -ldl -lrt -lstdc++
ifeq ($(WITH_CUDA),1)
CFLAGS   += -DDS4_WITH_CUDA
LIB_OBJ  += $(CUDA_SRC:%.cu=$(BUILD)/%.o)
LDLIBS   += $(CUDA_LIBS)
endif

# program name -> its sources (a program is built only when it has sources)
SRC_ds4         := $(wildcard cli/*.c)
SRC_ds4-gguf    := $(wildcard tools/gguf_dump.c)
SRC_ds4-convert := $(wildcard tools/convert/*.c)
SRC_ds4-server  := $(wildcard server/*.c)
SRC_ds4-bench   := $(wildcard tools/bench.c)
PROGRAMS := $(foreach p,ds4 ds4-gguf ds4-convert ds4-server ds4-bench,$(if $(SRC_$(p)),$(p)))

TEST_SRC := tests/runner.c $(sort $(wildcard tests/unit/*.c))
TEST_OBJ := $(TEST_SRC:%.c=build/asan/%.o)
FUZZ_SRC := $(sort $(wildcard tests/fuzz/fuzz_*.c))
FUZZ_BIN := $(FUZZ_SRC:tests/fuzz/%.c=build/fuzz/%)
DEV_SRC  := $(sort $(wildcard dev/*.c))
DEV_BIN  := $(DEV_SRC:dev/%.c=$(BUILD)/dev/%)


.PHONY: all deps test test-cuda fuzz cuda clean check-includes dev fmt demo-model
all: deps $(PROGRAMS) $(BUILD)/libds4.so

# Installs the Debian -dev packages the build links against when missing.
deps: build/.deps-ok
build/.deps-ok: tools/install_deps.sh
	@mkdir -p build
	@bash tools/install_deps.sh
	@touch $@

$(BUILD)/libds4.a: $(LIB_OBJ)
	@rm -f $@
	ar rcs $@ $^
$(BUILD)/libds4.so: $(LIB_OBJ)
	$(CC) -shared -o $@ $^ $(LDLIBS)

$(BUILD)/%.o: %.c | build/.deps-ok
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -c $< -o $@

define PROGRAM_RULE
$(1): $$(SRC_$(1):%.c=$(BUILD)/%.o) $(BUILD)/libds4.a
	$$(CC) $$(CFLAGS) -o $$@ $$^ $$(LDFLAGS) $$(LDLIBS)
endef
$(foreach p,$(PROGRAMS),$(eval $(call PROGRAM_RULE,$(p))))

# Unit tests run under AddressSanitizer and UndefinedBehaviorSanitizer.
build/asan/%.o: %.c | build/.deps-ok
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(SAN) -Itests -c $< -o $@
build/ds4-test: $(TEST_OBJ) $(ASAN_OBJ)
	$(CC) $(CFLAGS) $(SAN) -o $@ $^ $(LDLIBS)
# The converter and the server under the same sanitizers: the damaged-input
# tests run build/asan/ds4-convert; DS4_TEST_SERVER_BIN=build/asan/ds4-server
# runs the server suites against the sanitized server.
ASAN_PROGRAMS := $(foreach p,ds4-convert ds4-server,$(if $(SRC_$(p)),build/asan/$(p)))
define ASAN_PROGRAM_RULE
build/asan/$(1): $$(SRC_$(1):%.c=build/asan/%.o) $$(ASAN_OBJ)
	$$(CC) $$(CFLAGS) $$(SAN) -o $$@ $$^ $$(LDFLAGS) $$(LDLIBS)
endef
$(foreach p,ds4-convert ds4-server,$(if $(SRC_$(p)),$(eval $(call ASAN_PROGRAM_RULE,$(p)))))

test: all build/ds4-test $(ASAN_PROGRAMS) $(DEV_BIN) build/demo.gguf
	@bash tools/test_env.sh
	@.venv/bin/python tests/run.py

# Fuzz targets (libFuzzer, clang). `make fuzz FUZZ_SECONDS=600` runs each.
FUZZ_SECONDS ?= 60
FUZZ_CC ?= clang
build/fuzz/%: tests/fuzz/%.c $(LIB_SRC) | build/.deps-ok
	@mkdir -p $(dir $@)
	$(FUZZ_CC) -std=c11 -O1 -g -D_GNU_SOURCE -Isrc -Itests -ffp-contract=off \
	  -fsanitize=fuzzer,address,undefined -o $@ $< $(LIB_SRC) $(LDLIBS)
fuzz: $(FUZZ_BIN)
	@for f in $(FUZZ_BIN); do n=$$(basename $$f); mkdir -p fuzz-out/$$n; \
	  seeds=tests/fuzz/corpus/$$n; [ -d $$seeds ] || seeds=; \
	  echo "== $$n for $(FUZZ_SECONDS) s"; \
	  $$f -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 fuzz-out/$$n $$seeds || exit 1; done

# Scratch harnesses (CPU benchmarks and the like); built by `make dev`.
dev: $(DEV_BIN)
$(BUILD)/dev/%: dev/%.c $(BUILD)/libds4.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -o $@ $< $(BUILD)/libds4.a $(LDLIBS)

# CUDA backend: `make cuda` rebuilds the programs with it (objects in
# build/cuda/; the CPU-only objects of build/ are untouched). -gencode with
# sm_90a: wgmma/setmaxnreg need the "a" target (HOPPER.md).
# NCCL (the layer split over GPUs) needs only its header here: the library
# is loaded at run time. Found in the CUDA toolkit, /usr/include, or the
# nvidia-nccl wheel of a Python install; NCCL_INC=DIR overrides; without it
# the build still works and --gpus with several parts says NCCL is missing.
NCCL_INC ?= $(firstword $(foreach d,$(CUDA_HOME)/include /usr/include \
              $(shell python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "include"))' 2>/dev/null),\
              $(if $(wildcard $(d)/nccl.h),$(d))))
NVFLAGS ?= -O3 -std=c++17 -gencode=arch=compute_$(subst sm_,,$(CUDA_ARCH)),code=$(CUDA_ARCH) -Isrc \
           -Xcompiler -fPIC -Xcompiler -Wall -lineinfo $(if $(NCCL_INC),-I$(NCCL_INC))
# extra nvcc defines for kernel variants, e.g. NVDEFS=-DCU_IQ2_SIGNS=0; the
# objects depend on a stamp of the flags, so changing them rebuilds
NVDEFS ?=
$(BUILD)/nvflags.stamp: nvflags-force
	@mkdir -p $(dir $@)
	@echo '$(NVFLAGS) $(NVDEFS)' | cmp -s - $@ || echo '$(NVFLAGS) $(NVDEFS)' > $@
.PHONY: nvflags-force
nvflags-force:
$(BUILD)/src/cuda/%.o: src/cuda/%.cu $(wildcard src/cuda/*.cuh) src/backend.h src/model.h src/quant.h src/synth.h \
                       $(BUILD)/nvflags.stamp
	@mkdir -p $(dir $@)
	$(NVCC) $(NVFLAGS) $(NVDEFS) -c $< -o $@
cuda:
	@command -v $(NVCC) >/dev/null || { echo "make cuda: nvcc not found"; exit 1; }
	$(MAKE) BUILD=build/cuda WITH_CUDA=1 all

# GPU tests (needs a CUDA device): oracle fixtures through the CUDA
# backend, CUDA vs CPU on quantized models, graphs, determinism; ends with
# "N passed, N failed".
test-cuda: cuda build/demo.gguf build/cuda/test_stages
	@$(if $(wildcard .venv/bin/python),.venv/bin/python,python3) tests/cuda/run_cuda_tests.py
build/cuda/test_stages: tests/cuda/test_stages.c tests/unit/test_model_build.c $(CUDA_SRC) $(LIB_SRC)
	$(MAKE) cuda
	$(CC) $(CFLAGS) -DDS4_WITH_CUDA -Itests -o $@ $< build/cuda/libds4.a $(LDLIBS) $(CUDA_LIBS)


# Demo model (issue 5): a small random-weight DeepSeek V4 with the full tokenizer,
# for trying the text path on a CPU in seconds. Its text is meaningless.
demo-model: build/demo.gguf
build/demo.gguf: ds4-convert tests/data/deepseek-v3-tokenizer.json
	./ds4-convert --demo -o $@ --tokenizer tests/data/deepseek-v3-tokenizer.json

check-includes:
	@bash tools/check_includes.sh

fmt:
	clang-format -i $$(git ls-files '*.c' '*.h' '*.cu' '*.cuh')

clean:
	rm -rf build $(PROGRAMS) fuzz-out

-include $(shell find build -name '*.d' 2>/dev/null)
