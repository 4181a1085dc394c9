#!/bin/sh
# Rebuild the PSP reference vectors: build Google's psp_encrypt from its
# source (github.com/google/psp, src/: psp.h, psp_encrypt.c) and encrypt the
# cleartext captures with every configuration in cfg/.
#   testdata/psp/make.sh SRC_DIR OUT_DIR
# Needs gcc, libpcap-dev and libssl-dev. The committed vectors were made so
# from google/psp commit 90a4a942.
set -eu
src=$1
out=$2
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
gcc -O2 -o "$out/psp_encrypt" "$src/psp_encrypt.c" -lpcap -lcrypto 2>"$out/build.log"
for cfg in "$here"/cfg/*.cfg; do
	name=$(basename "$cfg" .cfg)
	for v in v4 v6; do
		"$out/psp_encrypt" -c "$cfg" -i "$here/${v}_cleartext.pcap" -o "$out/${name}_${v}.pcap" >/dev/null
	done
done
