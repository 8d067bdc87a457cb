#!/usr/bin/env python3
"""Write the VGG19 feature weights the archive ships (conv1_1 .. conv5_1 only).

Sources, in order:
  1. --weights FILE: a torchvision VGG19 checkpoint (`features.N.weight`) or a
     features-only state dict (`N.weight`); recorded as `custom`, or
     `imagenet` when its bytes are torchvision's IMAGENET1K_V1 file.
  2. torchvision's VGG19_Weights.IMAGENET1K_V1, from the torch hub cache or
     downloaded where the network allows.
  3. Offline with nothing cached: deterministic random weights
     (torch.manual_seed(0), torchvision.models.vgg19()), with a loud warning.
     --require-imagenet turns this case into an error (the Dockerfile uses it).

Writes OUT (a features-only state dict) and OUT with a .json suffix recording
the kind, which the handler reports in the X-Weights header.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import pickle
import socket
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "handler"))
from nst.vgg import features_state_dict, random_features_state  # noqa: E402
from nst.weights import FILE_NAME  # noqa: E402
from nst.weights import RANDOM_WARNING, sidecar  # noqa: E402

log = logging.getLogger("fetch_weights")
# torchvision's published file for VGG19_Weights.IMAGENET1K_V1; the name embeds
# the first hex digits of its SHA-256.
IMAGENET_FILE = "vgg19-dcbb9e9d.pth"


def imagenet_state() -> dict:
    """torchvision's ImageNet VGG19 (hub cache first, else download)."""
    from torchvision.models import VGG19_Weights

    return VGG19_Weights.IMAGENET1K_V1.get_state_dict(progress=False, check_hash=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=f"weights/{FILE_NAME}", help="output state dict")
    ap.add_argument("--weights", help="use this local checkpoint instead of torchvision's")
    ap.add_argument("--require-imagenet", action="store_true", help="fail instead of writing random weights")
    ap.add_argument("--random", action="store_true", help="write the deterministic random weights directly")
    ap.add_argument("--timeout", type=float, default=30.0, help="network timeout for the download, s")
    args = ap.parse_args(argv)
    if args.random and (args.require_imagenet or args.weights):
        ap.error("--random writes random weights: not with --require-imagenet or --weights")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    source = ""
    if args.weights:
        path = Path(args.weights)
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
            state = features_state_dict(raw)
        except (OSError, RuntimeError, ValueError, pickle.UnpicklingError, EOFError) as e:
            log.error("cannot use %s as VGG19 weights: %s", path, str(e).splitlines()[0][:200])
            return 1
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        kind = "imagenet" if IMAGENET_FILE.split("-")[1].split(".")[0] == digest[:8] else "custom"
        if args.require_imagenet and kind != "imagenet":
            log.error("%s is not torchvision's ImageNet VGG19 file and --require-imagenet given", path)
            return 1
        source = str(path)
    elif args.random:
        state, kind, source = random_features_state(0), "random", "torch.manual_seed(0); vgg19(weights=None)"
    else:
        socket.setdefaulttimeout(args.timeout)
        try:
            state, kind, source = features_state_dict(imagenet_state()), "imagenet", "VGG19_Weights.IMAGENET1K_V1"
        except Exception as e:  # offline, proxy, hash mismatch: all mean "not available"
            if args.require_imagenet:
                log.error("ImageNet VGG19 weights unavailable (%s) and --require-imagenet given", e)
                return 1
            log.warning("could not obtain ImageNet VGG19 weights: %s", str(e).splitlines()[0][:200])
            state, kind, source = random_features_state(0), "random", "torch.manual_seed(0); vgg19(weights=None)"
    if kind == "random":
        bar = "!" * 78
        log.warning("%s\n%s\n%s", bar, RANDOM_WARNING, bar)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, out)
    sidecar(out).write_text(json.dumps({"kind": kind, "source": source}, indent=2) + "\n")
    log.info("wrote %s (%s weights, %d tensors)", out, kind, len(state))
    return 0


if __name__ == "__main__":
    sys.exit(main())
