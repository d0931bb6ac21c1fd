# The README's two commands are `make run` and `make test`; CI runs the same.
PYTHON ?= python3
PIP_FLAGS ?= --quiet --disable-pip-version-check --root-user-action=ignore

.PHONY: setup run test test-faithful

# Idempotent: installs the host tools and the package (editable), then
# nothing on later runs but a quick check.
# Host packages: gcc builds the shim and the test guests; the compressors
# (lzop included) make the loader's test kernels; iproute2 gives the network
# test its namespace and TAP device.
HOST_PACKAGES = gcc libc6-dev make dpkg gzip bzip2 xz-utils zstd lz4 lzop cpio iproute2

setup:
	@missing=$$(for p in $(HOST_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "setup: installing $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	@# (re)install when a dependency is missing or pyvmm is installed from another checkout
	@$(PYTHON) -c "import pathlib, pyvmm.xen_abi as x, construct, lz4, zstandard, lzokay, numpy, pytest, pytest_timeout, hypothesis, atheris; \
	  assert pathlib.Path(x.__file__).resolve().is_relative_to(pathlib.Path.cwd().resolve())" 2>/dev/null || \
	  (echo "setup: installing pyvmm (editable) and its Python dependencies"; \
	   $(PYTHON) -m pip install $(PIP_FLAGS) -e '.[test,fuzz]')

# Fetch the Debian cloud kernel and busybox, build the initramfs, boot it.
run: setup
	$(PYTHON) -m pyvmm --default-guest

test: setup
	$(PYTHON) -m pytest -q

# The selected set, inside kvm_amd under QEMU/TCG (see README).
test-faithful: setup
	$(PYTHON) -m pytest -q --lane faithful
