#!/usr/bin/env bash
# Throw-away TLS and SuperNode-authentication material for trying the secure localhost deployment of
# docs/FLOWER.md: a CA, a SuperLink certificate for 127.0.0.1/localhost signed by it, and one EC key pair
# (OpenSSH format, P-384) per SuperNode. A real deployment takes its certificates from the organisation's
# CA, and each SuperNode makes its own key pair and hands over only the public key.
#
# Usage: make_certificates.sh DIR [NUM_SUPERNODES]   (NUM_SUPERNODES defaults to 3)
# Re-running keeps the files DIR already holds and makes only the missing ones; a new CA also gets a new
# SuperLink certificate. Files are written to a temporary folder first, so an interrupted run leaves no
# half-written file behind. Writes DIR/ca.crt, ca.key, superlink.crt, superlink.key, supernode-<i>{,.pub}.
set -euo pipefail

if [[ $# -lt 1 || $# -gt 2 || ! ${2:-3} =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: $0 DIR [NUM_SUPERNODES]" >&2
    exit 2
fi
dir=$1
num_supernodes=${2:-3}
days=365

umask 077  # private keys readable by their owner only; the public files are opened up below
mkdir -p "$dir"
cd "$dir"
tmp=$(mktemp -d .make_certificates.XXXXXX)
trap 'rm -rf "$tmp"' EXIT

if [[ ! -f ca.crt || ! -f ca.key ]]; then
    openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days "$days" \
        -subj "/CN=sparsyfed-flower-example CA" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -keyout "$tmp/ca.key" -out "$tmp/ca.crt" 2>/dev/null
    mv "$tmp/ca.key" "$tmp/ca.crt" .
    rm -f superlink.crt  # signed by the CA this one replaces
    echo "made ca.crt, ca.key"
fi

if [[ ! -f superlink.crt || ! -f superlink.key ]]; then
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -subj "/CN=localhost" -keyout "$tmp/superlink.key" -out "$tmp/superlink.csr" 2>/dev/null
    # TLS clients check the address they dial against the subjectAltName, not the CN.
    cat > "$tmp/superlink.ext" <<EOF
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
EOF
    openssl x509 -req -in "$tmp/superlink.csr" -CA ca.crt -CAkey ca.key -CAcreateserial \
        -CAserial "$tmp/ca.srl" -days "$days" -extfile "$tmp/superlink.ext" \
        -out "$tmp/superlink.crt" 2>/dev/null
    mv "$tmp/superlink.key" "$tmp/superlink.crt" .
    echo "made superlink.crt, superlink.key"
fi
openssl verify -CAfile ca.crt superlink.crt >/dev/null  # a stale or foreign certificate stops here

for ((i = 0; i < num_supernodes; i++)); do
    if [[ ! -f supernode-$i || ! -f supernode-$i.pub ]]; then
        ssh-keygen -q -t ecdsa -b 384 -N "" -C "supernode-$i" -f "$tmp/supernode-$i"
        mv "$tmp/supernode-$i" "$tmp/supernode-$i.pub" .
        echo "made supernode-$i, supernode-$i.pub"
    fi
done

chmod 644 ca.crt superlink.crt supernode-*.pub
echo "certificates and keys in $(pwd)"
