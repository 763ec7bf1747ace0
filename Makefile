# vimage: make demo (set up and run a real job on bundled data), make test, make bench.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP_PACKAGES := pytest hypothesis vermin xxhash zstandard lz4 fusepy tqdm blake3
DEB_PACKAGES := partclone partimage ntfs-3g libfuse2 fuse3 dosfstools mtools e2fsprogs \
                pigz lbzip2 lzip lzop zstd lz4 xz-utils bzip2 liblzo2-dev util-linux \
                fusefat exfat-fuse btrfs-progs xfsprogs par2 exfatprogs f2fs-tools gdisk \
                parted fdisk
DEMO   := build/demo

.PHONY: all setup debs demo test bench testdata clean

all: test

# Debian packages: installed when we are root and some are missing; otherwise
# the tests that need a missing tool are skipped.
debs:
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian packages:" $$missing; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "note: missing Debian packages (tests needing them are skipped):" $$missing; fi; \
	fi

$(VENV)/.ready:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q $(PIP_PACKAGES)
	-$(VENV)/bin/pip install -q python-lzo || echo "note: python-lzo did not build; lzop tests are skipped"
	touch $@

setup: debs $(VENV)/.ready

demo: setup
	@rm -rf $(DEMO) && mkdir -p $(DEMO)/mnt
	@echo "== a split, pigz-compressed partclone image"
	$(PY) vimage.py info testdata/sda1.ext4-ptcl-img.gz.aa
	$(PY) vimage.py verify testdata/sda1.ext4-ptcl-img.gz.aa
	$(PY) vimage.py extract testdata/sda1.ext4-ptcl-img.gz.aa $(DEMO)/sda1.raw
	@echo "restored:" $$(sha256sum < $(DEMO)/sda1.raw | cut -c1-64)
	@echo "expected:" $$($(PY) -c "import json;print(json.load(open('testdata/expected.json'))['sda1.ext4-ptcl-img.gz.aa']['sha256'])")
	@echo "== a whole Clonezilla image directory (MBR, logical partitions, swap, zstd in 1 MB pieces)"
	$(PY) vimage.py info testdata/clonezilla/mbr-zstd-split
	$(PY) vimage.py verify testdata/clonezilla/mbr-zstd-split
	$(PY) vimage.py extract testdata/clonezilla/mbr-zstd-split $(DEMO)/disk.img
	@echo "restored disk:" $$(sha256sum < $(DEMO)/disk.img | cut -c1-64)
	@echo "ocs-sr truth: " $$($(PY) -c "import json;print(json.load(open('testdata/clonezilla/expected.json'))['mbr-zstd-split']['disks'][0]['sha256'])")
	@if [ "$$(id -u)" = 0 ] && [ -e /dev/fuse ]; then \
	  set -e; \
	  $(PY) vimage.py mount testdata/clonezilla/mbr-zstd-split $(DEMO)/mnt; \
	  ls -l $(DEMO)/mnt; sfdisk -d $(DEMO)/mnt/loop0; \
	  $(PY) vimage.py umount $(DEMO)/mnt; \
	  echo "== the files of every partition, straight from the backup"; \
	  $(PY) vimage.py mount --files --cache-dir $(DEMO)/cache testdata/clonezilla/mbr-zstd-split $(DEMO)/mnt; \
	  ls -l $(DEMO)/mnt $(DEMO)/mnt/loop0p1; \
	  $(PY) vimage.py umount $(DEMO)/mnt; \
	  echo "== session 2 of a real Wyng archive, mounted"; \
	  $(PY) vimage.py mount --files --session 20261203-155447 testdata/wyng/ext4-zlib $(DEMO)/mnt; \
	  ls -l $(DEMO)/mnt; \
	  $(PY) vimage.py umount $(DEMO)/mnt; \
	else echo "(mount demo skipped: needs root and /dev/fuse)"; fi

test: setup
	$(VENV)/bin/vermin -t=3.8- --violations --no-tips vimage.py
	$(PY) -m pytest -q -rs tests

bench: setup
	$(PY) tests/bench.py

# Rebuild testdata/ with the real tools (root; writes testdata/expected.json).
testdata: debs
	bash testdata/make-testdata.sh

clean:
	rm -rf $(VENV) build .pytest_cache tests/__pycache__ __pycache__
