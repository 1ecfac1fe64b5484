"""Signs an OCI image the way cosign does with a key, through the registry's own HTTP API
and openssl, so nothing of Filterplane's code writes the signature: a simplesigning
payload naming the manifest digest, signed (ECDSA P-256, SHA-256, ASN.1 DER, base64) and
pushed as a layer of the manifest tagged sha256-HEX.sig, with the signature in the
layer's dev.cosignproject.cosign/signature annotation.
Usage: cosign_sign.py REGISTRY REPOSITORY MANIFEST_DIGEST KEY.pem [NAMED_DIGEST [tamper]]
(NAMED_DIGEST: the digest the payload names, default MANIFEST_DIGEST; tamper: the payload
stored is not the one signed)."""
import base64
import hashlib
import json
import subprocess
import sys
import urllib.request


def put_blob(base, repo, data):
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    req = urllib.request.Request(f"{base}/v2/{repo}/blobs/uploads/", method="POST", data=b"")
    with urllib.request.urlopen(req) as r:
        location = r.headers["Location"]
    if location.startswith("/"):
        location = base + location
    sep = "&" if "?" in location else "?"
    req = urllib.request.Request(f"{location}{sep}digest={digest}", method="PUT", data=data,
                                 headers={"Content-Type": "application/octet-stream"})
    urllib.request.urlopen(req).close()
    return digest


def main():
    registry, repo, manifest_digest, key = sys.argv[1:5]
    named = sys.argv[5] if len(sys.argv) > 5 else manifest_digest
    tamper = len(sys.argv) > 6 and sys.argv[6] == "tamper"
    base = f"http://{registry}"
    payload = json.dumps({
        "critical": {
            "identity": {"docker-reference": f"{registry}/{repo}"},
            "image": {"docker-manifest-digest": named},
            "type": "cosign container image signature",
        },
        "optional": None,
    }).encode()
    der = subprocess.run(["openssl", "dgst", "-sha256", "-sign", key], input=payload, capture_output=True, check=True).stdout
    signature = base64.b64encode(der).decode()
    if tamper:
        payload = payload.replace(b'"optional": null', b'"optional": {"x": 1}')
    payload_digest = put_blob(base, repo, payload)
    config = b"{}"
    config_digest = put_blob(base, repo, config)
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "size": len(config), "digest": config_digest},
        "layers": [{
            "mediaType": "application/vnd.dev.cosign.simplesigning.v1+json",
            "size": len(payload),
            "digest": payload_digest,
            "annotations": {"dev.cosignproject.cosign/signature": signature},
        }],
    }).encode()
    tag = manifest_digest.replace(":", "-") + ".sig"
    req = urllib.request.Request(f"{base}/v2/{repo}/manifests/{tag}", method="PUT", data=manifest,
                                 headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
    urllib.request.urlopen(req).close()
    print(tag)


if __name__ == "__main__":
    main()
