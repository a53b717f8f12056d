"""``python -m cps_fast.predict --checkpoint CKPT IMAGE_OR_DIR --out DIR``: colour PNG masks.

Writes ``<name>.png`` (palette PNG: the class index per pixel with the dataset's colours,
so it is both viewable and machine-readable) and, with ``--overlay``, ``<name>_overlay.jpg``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .cli import run_main
from .data.io import read_image
from .data.transforms import normalize
from .engine.evaluator import predict_logits
from .engine.trainer import resolve_device
from .errors import DataError
from .inference import load_networks

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cps_fast.predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("inputs", nargs="+", help="image files or folders")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--network", choices=("a", "b", "ensemble"), default="a")
    p.add_argument("--overlay", action="store_true", help="also write the mask blended on the image")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return p


def collect_images(inputs: list[str]) -> list[Path]:
    files = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_EXTS)
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"{p}: no such file or directory")
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_EXTS)}) in {', '.join(inputs)}")
    return files


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    device = resolve_device(args.device)
    cfg, nets, meta = load_networks(args.checkpoint, device, args.overrides)
    palette = np.asarray(meta["palette"], dtype=np.uint8)
    use = list(nets.values()) if args.network == "ensemble" else [nets[args.network]]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = collect_images(args.inputs)
    with torch.no_grad():
        for f in files:
            img = read_image(str(f))
            x = torch.from_numpy(normalize(img, cfg.data.mean, cfg.data.std)).unsqueeze(0).to(device)
            probs = sum(predict_logits(n, x, cfg.eval, cfg.data.num_classes).softmax(1) for n in use)
            pred = probs.argmax(1)[0].to(torch.uint8).cpu().numpy()
            mask = Image.fromarray(pred, mode="P")
            flat = np.zeros((256, 3), dtype=np.uint8)
            flat[:len(palette)] = palette[:256]
            mask.putpalette(flat.reshape(-1).tolist())
            mask.save(out / f"{f.stem}.png")
            if args.overlay:
                colour = flat[pred]
                blend = (0.5 * img.astype(np.float32) + 0.5 * colour).astype(np.uint8)
                Image.fromarray(blend).save(out / f"{f.stem}_overlay.jpg", quality=92)
            print(f"{f} -> {out / (f.stem + '.png')}")
    return 0


if __name__ == "__main__":
    run_main(main)
