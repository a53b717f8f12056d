"""NVIDIA DALI input pipelines: decode and augment on the GPU (or DALI's CPU backend).

``build_dali_streams`` is what ``loader.build_train_streams`` calls for ``data.loader=dali``;
its streams honour the ``TrainStream`` contract of ``loader.py`` exactly and produce the
very same samples as the PyTorch loader, up to the resampling filter (DALI's antialiased
linear resize vs PIL's bilinear: a level or two of 255 at most) and the JPEG decoder
(nvJPEG on the GPU):

- the host reuses the PyTorch loader's sampler (stream_order.py): the epoch order
  ``epoch_permutation(seed, name, epoch)``, the rank's share ``shard_positions`` and the
  run-on-across-epochs batching (``KeySampler``), and each sample's RNG
  ``sample_rng(seed, name, epoch, position)``
  from which ``transforms.draw_params`` draws (scale, crop offsets, flip) — so the DALI
  path draws the same random values, and ``state_dict`` / ``load_state_dict`` resume it
  exactly as they resume the PyTorch one;
- the host reads the encoded files and their headers only (``dali_host``); the pipeline gets
  bytes and per-sample parameters through ``fn.external_source`` and does the rest:
  decode (``device="mixed"``: nvJPEG / hardware decoder; ``"cpu"`` without a GPU), resize
  to the drawn size (image linear, label nearest), the Cityscapes labelId -> trainId table,
  and ``crop_mirror_normalize`` (bottom/right padding to the crop size: 0 after
  normalisation for images, 255 for labels; the drawn flip; ImageNet normalisation; CHW or
  HWC layout; float32 / float16) in one op per tensor;
- only the input region that lands in the crop window is resampled (``window``): the same
  sample positions as resizing the whole image and cropping, at a fraction of the work;
- outputs are torch tensors on the pipeline's device; ``next_into`` writes them straight
  into caller-owned buffers (a CUDA graph's static inputs) on the caller's stream;
- a corrupt or missing file fails as ``DataError`` naming it: the host checks existence,
  headers, truncation and sizes before DALI sees the bytes, and when DALI still fails the
  batches in flight are decoded with the PyTorch path's strict readers to name the file.

Graph: processing functions (``augment_image``, ``augment_label``, ``normalize_val``) are
separate from the input (``external_source``) and from the pipeline definitions.
"""

from __future__ import annotations

import collections
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

import numpy as np
import torch

import nvidia.dali.fn as fn
import nvidia.dali.types as types
from nvidia.dali import pipeline_def
from nvidia.dali.plugin.pytorch import feed_ndarray

from ..config import DataConfig
from ..errors import ConfigError, DataError
from .dali_host import HostSample, check_label_batch, find_bad_file, prepare_sample
from .datasets import DatasetInfo, Splits
from .stream_order import (KeySampler, StreamPosition, epoch_permutation, sample_rng,
                           shard_positions)
from .transforms import AugParams, draw_params

__all__ = ["DaliTrainStream", "build_dali_streams", "iterate_val_dali", "dali_device_id",
           "train_pipeline", "val_pipeline", "augment_image", "augment_label"]

_TORCH_TO_DALI = {torch.float32: types.FLOAT, torch.float16: types.FLOAT16,
                  torch.uint8: types.UINT8, torch.int64: types.INT64, torch.int32: types.INT32}


# --------------------------------------------------------------------------- processing


def decode(data, device: str, gray: bool = False):
    """Encoded bytes -> HWC uint8 (RGB, or one grey channel for label PNGs)."""
    return fn.decoders.image(data, device=device,
                             output_type=types.GRAY if gray else types.RGB)


def apply_lut(labels, lut: Optional[np.ndarray]):
    """Raw label values -> classes through a (256,) table (Cityscapes labelIds)."""
    if lut is None:
        return labels
    return fn.lookup_table(labels, keys=list(range(256)), values=[int(v) for v in lut],
                           default_value=255, dtype=types.UINT8)


def _pad_flip_args(crop: int, mirror) -> dict:
    # The input is already the visible part of the crop window (see ``window``): anchor it
    # at the top-left and pad the bottom / right up to ``crop``, as the PyTorch path.
    return dict(crop=(crop, crop), crop_pos_y=0.0, crop_pos_x=0.0, mirror=mirror,
                out_of_bounds_policy="pad")


def _resize_window(data, size, roi_start, roi_end, interp):
    """Resample only the input region that lands in the crop window: sample positions are
    those of resizing the whole image to the drawn size and cropping (same scale, same
    pixel centres), at a fraction of the work (1/10 at scale 1.75 on Cityscapes)."""
    return fn.resize(data, size=size, roi_start=roi_start, roi_end=roi_end, roi_relative=False,
                     interp_type=interp, antialias=interp != types.INTERP_NN)


def augment_image(images, size, roi_start, roi_end, mirror, crop: int, mean: Sequence[float],
                  std: Sequence[float], dtype=types.FLOAT, layout: str = "CHW"):
    """Resize (linear, antialiased like PIL's BILINEAR), pad / flip / normalise."""
    images = _resize_window(images, size, roi_start, roi_end, types.INTERP_LINEAR)
    # (x - 255 m) / (255 s) == (x / 255 - m) / s; fill_values are OUTPUT values, so the
    # padding is 0 after normalisation (checked in tests/data/test_dali.py).
    return fn.crop_mirror_normalize(
        images, **_pad_flip_args(crop, mirror),
        mean=[255.0 * m for m in mean], std=[255.0 * s for s in std], fill_values=0.0,
        dtype=dtype, output_layout=layout)


def augment_label(labels, size, roi_start, roi_end, mirror, crop: int,
                  lut: Optional[np.ndarray], ignore_index: int = 255, dtype=types.INT64):
    """Resize (nearest, as PIL's NEAREST), LUT, pad with ``ignore_index`` / flip."""
    labels = _resize_window(labels, size, roi_start, roi_end, types.INTERP_NN)
    labels = apply_lut(labels, lut)
    labels = fn.crop_mirror_normalize(labels, **_pad_flip_args(crop, mirror),
                                      fill_values=float(ignore_index), dtype=types.UINT8,
                                      output_layout="CHW")
    labels = fn.squeeze(labels, axes=[0])  # 1 x c x c -> c x c
    return labels if dtype == types.UINT8 else fn.cast(labels, dtype=dtype)


def normalize_val(images, mean: Sequence[float], std: Sequence[float], dtype=types.FLOAT):
    """No augmentation: normalise, CHW."""
    return fn.crop_mirror_normalize(images, mean=[255.0 * m for m in mean],
                                    std=[255.0 * s for s in std], dtype=dtype,
                                    output_layout="CHW")


# --------------------------------------------------------------------------- pipelines


@pipeline_def
def train_pipeline(with_labels: bool, decoder: str, crop: int, mean, std, lut, ignore_index,
                   image_dtype, label_dtype, layout):
    """Inputs (``feed_input`` by name): ``images`` / ``labels`` (encoded bytes), and per
    sample (see ``window``): ``size`` (float32 [h, w] of the visible crop region),
    ``roi_start`` / ``roi_end`` (float32 [y, x] of that region in input pixels), ``mirror``
    (int32)."""
    size = fn.external_source(name="size", device="cpu")
    roi_start = fn.external_source(name="roi_start", device="cpu")
    roi_end = fn.external_source(name="roi_end", device="cpu")
    mirror = fn.external_source(name="mirror", device="cpu")
    images = decode(fn.external_source(name="images", device="cpu"), decoder)
    out_img = augment_image(images, size, roi_start, roi_end, mirror, crop, mean, std,
                            image_dtype, layout)
    if not with_labels:
        return out_img
    labels = decode(fn.external_source(name="labels", device="cpu"), decoder, gray=True)
    return out_img, augment_label(labels, size, roi_start, roi_end, mirror, crop, lut,
                                  ignore_index, label_dtype)


@pipeline_def
def val_pipeline(with_labels: bool, decoder: str, mean, std, lut, image_dtype, label_dtype):
    """Full-resolution validation: normalised CHW image, label (H, W) after the LUT."""
    images = decode(fn.external_source(name="images", device="cpu"), decoder)
    out_img = normalize_val(images, mean, std, image_dtype)
    if not with_labels:
        return out_img
    labels = apply_lut(decode(fn.external_source(name="labels", device="cpu"), decoder,
                              gray=True), lut)
    labels = fn.squeeze(labels, axes=[2])  # H x W x 1 -> H x W
    return out_img, (labels if label_dtype == types.UINT8 else fn.cast(labels, dtype=label_dtype))


# --------------------------------------------------------------------------- helpers


def dali_device_id(device=None) -> Optional[int]:
    """The CUDA index a pipeline runs on, or None for DALI's CPU backend.

    ``device`` None / "auto": the current CUDA device when torch sees one, else CPU.
    """
    if device is None or str(device) == "auto":
        return torch.cuda.current_device() if torch.cuda.is_available() else None
    dev = torch.device(device)
    if dev.type == "cpu":
        return None
    if dev.type != "cuda":
        raise ConfigError(f"data.loader=dali: cannot run on device {device}")
    return dev.index if dev.index is not None else torch.cuda.current_device()


def window(p: AugParams, height: int, width: int, crop: int) -> tuple:
    """The part of the crop window that lies on the scaled image, for ``_resize_window``:
    (region size [rh, rw], roi_start [y, x], roi_end [y, x]) with the ROI in input pixels.

    Resizing the whole ``height x width`` image to ``p.size`` and cropping rows
    ``crop_y .. crop_y + rh`` samples input row ``(crop_y + i + 0.5) * height / sh``; a
    resize of the ROI ``[crop_y * height / sh, (crop_y + rh) * height / sh)`` to ``rh`` rows
    samples exactly there (likewise for columns)."""
    sh, sw = p.size
    rh, rw = min(sh - p.crop_y, crop), min(sw - p.crop_x, crop)
    fy, fx = height / sh, width / sw
    return (np.array([rh, rw], np.float32),
            np.array([p.crop_y * fy, p.crop_x * fx], np.float32),
            np.array([(p.crop_y + rh) * fy, (p.crop_x + rw) * fx], np.float32))


def _default_threads(cfg: DataConfig) -> int:
    env = os.environ.get("CPS_FAST_DALI_THREADS")
    return max(1, int(env)) if env else max(1, cfg.num_workers)


class _Pending:
    """A batch fed to DALI and not yet returned: its samples and drawn parameters, or the
    error its host preparation raised (DALI then got a stand-in batch)."""
    __slots__ = ("samples", "params", "error")

    def __init__(self, samples, params, error: Optional[DataError] = None):
        self.samples, self.params, self.error = samples, params, error


# --------------------------------------------------------------------------- train stream


class DaliTrainStream(StreamPosition):
    """The ``TrainStream`` contract (loader.py) on a DALI pipeline.

    ``next()`` returns ``{"image": (B,3,c,c), "label": (B,c,c)}`` (no "label" without
    labels) on the pipeline's device; ``next_into(buffers, stream)`` writes into given
    tensors instead. ``image_dtype``: float32, float16 or bfloat16 (cast after DALI);
    ``channels_last``: the image tensor is NCHW with channels-last memory (DALI writes HWC);
    ``label_dtype``: int64 or uint8.
    """

    def __init__(self, samples, info: DatasetInfo, cfg: DataConfig, batch_size: int, seed: int,
                 name: str, with_labels: bool = True, rank: int = 0, world_size: int = 1,
                 device=None, image_dtype: torch.dtype = torch.float32,
                 label_dtype: torch.dtype = torch.int64, channels_last: bool = False,
                 num_threads: Optional[int] = None, prefetch: int = 2,
                 host_threads: Optional[int] = None, check_labels: Optional[bool] = None):
        if not samples:
            raise DataError(f"{name}: no samples to stream")
        if batch_size < 1:
            raise ConfigError(f"data: {name} batch size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside world size {world_size}")
        self.samples, self.info, self.cfg = list(samples), info, cfg
        self.name, self.seed, self.batch_size = name, int(seed), batch_size
        self.with_labels, self.rank, self.world_size = with_labels, rank, world_size
        self.device_id = dali_device_id(device)
        self.device = torch.device("cpu") if self.device_id is None \
            else torch.device("cuda", self.device_id)
        self.set_output(image_dtype, label_dtype, channels_last)
        self.num_threads = num_threads or _default_threads(cfg)
        self.prefetch = max(1, int(prefetch))
        self.host_threads = host_threads or max(1, min(8, self.num_threads))
        # Checking label values costs a pass over the crop on the host: CPU pipelines only.
        self.check_labels = (self.device_id is None) if check_labels is None else check_labels
        self._shard = shard_positions(len(self.samples), rank, world_size)
        self._shard_len = len(self._shard)
        self._epoch, self._pos = 0, 0       # the state after the batches returned so far
        self._pipe = None
        self._keys = None                   # iterator over batch keys (next to prepare)
        self._host: collections.deque = collections.deque()  # futures of prepared batches
        self._inflight: collections.deque = collections.deque()  # _Pending fed to DALI
        self._pool: Optional[ThreadPoolExecutor] = None
        self._perms: dict = {}
        self._last_feed: Optional[dict] = None
        # What the last returned batch was made of (Samples, transforms.AugParams).
        self.last_samples: list = []
        self.last_params: list = []
        self._lock = threading.Lock()

    def set_output(self, image_dtype: Optional[torch.dtype] = None,
                   label_dtype: Optional[torch.dtype] = None,
                   channels_last: Optional[bool] = None) -> None:
        """Choose what the step wants (streams from ``build_train_streams`` start as float32
        NCHW / int64); takes effect at the next batch, from the current state."""
        image_dtype = self.__dict__.get("image_dtype", torch.float32) if image_dtype is None \
            else image_dtype
        label_dtype = self.__dict__.get("label_dtype", torch.int64) if label_dtype is None \
            else label_dtype
        if image_dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ConfigError(f"data.loader=dali: image dtype {image_dtype} not supported")
        if label_dtype not in (torch.int64, torch.uint8, torch.int32):
            raise ConfigError(f"data.loader=dali: label dtype {label_dtype} not supported")
        if getattr(self, "_pipe", None) is not None:
            self.close()  # rebuilt lazily at the same state
        self.image_dtype, self.label_dtype = image_dtype, label_dtype
        if channels_last is not None:
            self.channels_last = bool(channels_last)

    # ---------------------------------------------------------------- host side
    def _perm(self, epoch: int) -> np.ndarray:
        with self._lock:
            p = self._perms.get(epoch)
            if p is None:
                p = epoch_permutation(len(self.samples), self.seed, self.name, epoch)
                self._perms = {e: v for e, v in self._perms.items() if e >= epoch - 1}
                self._perms[epoch] = p
            return p

    def _prepare_one(self, key) -> tuple:
        epoch, gpos = key
        s = self.samples[int(self._perm(epoch)[gpos % len(self.samples)])]
        hs = prepare_sample(s.image, s.label if self.with_labels else None,
                            self.info.num_classes, self.info.ignore_index)
        rng = sample_rng(self.seed, self.name, epoch, gpos)
        p = draw_params(rng, hs.height, hs.width, self.cfg.scales, self.cfg.crop_size,
                        self.cfg.flip)
        return s, hs, p

    def _submit_host_batch(self) -> None:
        keys = next(self._keys)
        self._host.append([self._pool.submit(self._prepare_one, k) for k in keys])

    def _feed_one(self) -> None:
        """Take the oldest prepared batch and feed it to DALI; keep the host ahead."""
        futures = self._host.popleft()
        self._submit_host_batch()
        try:
            items = [f.result() for f in futures]  # DataError of a bad file surfaces here
        except DataError as e:
            if not self._inflight or self._last_feed is None:
                raise  # it is the very next batch: report it now
            # Keep DALI's queue full with a stand-in; the error is raised when this batch
            # is due, so that the batches before it are still delivered.
            for name, data in self._last_feed.items():
                self._pipe.feed_input(name, data)
            self._inflight.append(_Pending([], [], e))
            return
        samples = [it[0] for it in items]
        hs: list = [it[1] for it in items]
        params: list = [it[2] for it in items]
        wins = [window(p, h.height, h.width, self.cfg.crop_size) for p, h in zip(params, hs)]
        inputs = {
            "images": [h.image for h in hs],
            "size": [w[0] for w in wins],
            "roi_start": [w[1] for w in wins],
            "roi_end": [w[2] for w in wins],
            "mirror": [np.array(int(p.flip), np.int32) for p in params],
        }
        if self.with_labels:
            inputs["labels"] = [h.label for h in hs]
        for name, data in inputs.items():
            self._pipe.feed_input(name, data)
        self._last_feed = inputs
        self._inflight.append(_Pending(samples, params))

    # ---------------------------------------------------------------- pipeline
    def _start(self) -> None:
        sampler = KeySampler(len(self.samples), self.batch_size, self.rank, self.world_size)
        sampler.start = (self._epoch, self._pos)
        self._keys = iter(sampler)
        self._pool = ThreadPoolExecutor(self.host_threads, thread_name_prefix=f"dali-{self.name}")
        gpu = self.device_id is not None
        img_dt = types.FLOAT16 if self.image_dtype == torch.float16 else types.FLOAT
        self._pipe = train_pipeline(
            with_labels=self.with_labels, decoder="mixed" if gpu else "cpu",
            crop=self.cfg.crop_size, mean=self.cfg.mean, std=self.cfg.std,
            lut=self.info.label_lut, ignore_index=self.info.ignore_index, image_dtype=img_dt,
            label_dtype=_TORCH_TO_DALI[self.label_dtype],
            layout="HWC" if self.channels_last else "CHW",
            batch_size=self.batch_size, num_threads=self.num_threads, device_id=self.device_id,
            prefetch_queue_depth=self.prefetch, seed=self.seed & 0x7FFFFFFF)
        self._pipe.build()
        try:
            for _ in range(self.prefetch + 1):
                self._submit_host_batch()
            for _ in range(self.prefetch):
                self._feed_one()
            self._pipe.schedule_run()  # the first call runs `prefetch` iterations
        except Exception:
            self.close()
            raise

    def _dali_failed(self, err: Exception) -> DataError:
        """Name the file behind a DALI failure: decode the batches in flight strictly."""
        samples = [s for p in self._inflight for s in p.samples]
        found = find_bad_file(samples, self.info.label_lut, self.info.num_classes,
                              self.info.ignore_index)
        if found is not None:
            return found
        first = next((ln.strip() for ln in str(err).splitlines()
                      if ln.strip() and "Critical error" not in ln), str(err)[:200])
        names = ", ".join(s.image for s in samples[:4]) + (" ..." if len(samples) > 4 else "")
        return DataError(f"DALI failed on a batch of {self.name} holding {names}: {first}")

    def _emit(self, key: str, tl, buf: Optional[torch.Tensor], stream) -> torch.Tensor:
        """Copy one DALI output into ``buf`` (directly when its dtype, device and layout
        allow) or into a fresh tensor."""
        t = tl.as_tensor()
        shape = tuple(t.shape())
        cast_bf16 = key == "image" and self.image_dtype == torch.bfloat16
        dtype = torch.float32 if cast_bf16 else (
            self.image_dtype if key == "image" else self.label_dtype)
        nhwc = key == "image" and self.channels_last  # DALI wrote N x H x W x C
        if buf is not None and buf.dtype == dtype and buf.device == self.device:
            storage = buf.permute(0, 2, 3, 1) if nhwc else buf
            if storage.is_contiguous() and tuple(storage.shape) == shape:
                feed_ndarray(t, storage, cuda_stream=stream)  # the one copy, on `stream`
                return buf
        tmp = torch.empty(shape, dtype=dtype, device=self.device)
        feed_ndarray(t, tmp, cuda_stream=stream)
        out = tmp.permute(0, 3, 1, 2) if nhwc else tmp  # channels-last NCHW view
        if cast_bf16:
            out = out.to(torch.bfloat16)  # keeps the memory format
        if buf is None:
            return out
        if tuple(buf.shape) != tuple(out.shape):
            raise ConfigError(f"{self.name}: buffer {key!r} has shape {tuple(buf.shape)}, "
                              f"the pipeline gives {tuple(out.shape)}")
        buf.copy_(out)
        return buf

    def next_into(self, buffers: Optional[dict] = None, stream=None) -> dict:
        """The next batch, written into ``buffers`` ({"image", "label"} tensors) where given.

        ``stream``: the CUDA stream the copies run on (the step's; default: current).
        """
        if self._pipe is None:
            self._start()
        if stream is None and self.device_id is not None:
            stream = torch.cuda.current_stream(self.device)
        try:
            # With a stream, the outputs are ready on it (no host wait); on the CPU backend
            # this waits for the batch, which DALI normally finished while the step ran.
            outs = self._pipe.share_outputs(stream) if stream is not None else \
                self._pipe.share_outputs()
        except Exception as e:  # noqa: BLE001 - DALI raises RuntimeError / IndexError
            err = self._dali_failed(e)
            self.close()  # the pipeline is invalid now; a retry restarts from the state
            raise err from None
        pending = self._inflight.popleft()
        if pending.error is not None:
            self.close()
            raise pending.error
        try:
            buffers = buffers or {}
            keys = ("image", "label") if self.with_labels else ("image",)
            result = {k: self._emit(k, tl, buffers.get(k), stream) for k, tl in zip(keys, outs)}
            if self.check_labels and self.with_labels and result["label"].device.type == "cpu":
                check_label_batch(result["label"].numpy(), pending.samples,
                                  self.info.num_classes, self.info.ignore_index)
        except Exception:
            self.close()
            raise
        self._pipe.release_outputs()
        self.last_samples, self.last_params = pending.samples, pending.params
        self._advance()
        try:
            self._feed_one()
            self._pipe.schedule_run()
        except Exception:  # noqa: BLE001
            # A DataError here means nothing is in flight (prefetch 1) and the bad batch is
            # the next one; a DALI error belongs to a batch not yet due. Either way this
            # batch is good: restart from the state at the next call, which raises the
            # error (mapped to the file) when its batch is due.
            self.close()
        return result

    # ---------------------------------------------------------------- contract
    def __next__(self) -> dict:
        return self.next_into(None)

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """Indices (into the sample list) of this rank's shard of ``epoch``, in order."""
        return epoch_permutation(len(self.samples), self.seed, self.name, epoch)[
            self._shard % len(self.samples)]

    def close(self) -> None:
        pipe, self._pipe = self._pipe, None
        pool, self._pool = self._pool, None
        self._host.clear()
        self._inflight.clear()
        self._keys = None
        self._last_feed = None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if pipe is not None:
            del pipe

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def build_dali_streams(cfg: DataConfig, splits: Splits, seed: int, method: str,
                       rank: int = 0, world_size: int = 1, device=None, **options) -> dict:
    """DALI counterpart of ``loader.build_train_streams`` (same keys and contract).

    ``device``: None/"auto" (the current CUDA device, else DALI's CPU backend), "cpu",
    "cuda" or "cuda:N". ``options`` go to ``DaliTrainStream`` (image_dtype, label_dtype,
    channels_last, num_threads, prefetch).
    """
    if method not in ("cps", "cps-cutmix", "supervised"):
        raise ConfigError(f"train.method: unknown method {method!r}")
    if not splits.labeled:
        raise DataError(f"{splits.sources.get('labeled', 'labeled split')}: no labeled images")
    common = dict(rank=rank, world_size=world_size, device=device, **options)
    streams = {"labeled": DaliTrainStream(splits.labeled, splits.info, cfg, cfg.batch_size,
                                          seed, "labeled", True, **common)}
    if method in ("cps", "cps-cutmix"):
        if not splits.unlabeled:
            raise DataError(f"{splits.sources.get('unlabeled', 'unlabeled split')}: no unlabeled "
                            f"images (split {cfg.split} leaves none); use train.method=supervised")
        if cfg.unlabeled_batch_size < 1:
            raise ConfigError(f"data.unlabeled_batch_size: must be >= 1 for method {method}")
        names = ["unlabeled"] + (["unlabeled2"] if method == "cps-cutmix" else [])
        for nm in names:
            streams[nm] = DaliTrainStream(splits.unlabeled, splits.info, cfg,
                                          cfg.unlabeled_batch_size, seed, nm, False, **common)
    return streams


# --------------------------------------------------------------------------- validation


def iterate_val_dali(samples, info: Optional[DatasetInfo] = None,
                     cfg: Optional[DataConfig] = None, max_images: Optional[int] = None,
                     device=None, prefetch: int = 2, num_threads: Optional[int] = None):
    """DALI counterpart of ``loader.iterate_val``: yields ``(image (1,3,H,W) float32, label
    (1,H,W) int64 or None, sample_id)`` at full resolution, in list order, on the
    pipeline's device."""
    if isinstance(samples, Splits):
        info = info or samples.info
        samples = samples.val
    if info is None or cfg is None:
        raise TypeError("iterate_val_dali needs info and cfg")
    limit = max_images if max_images is not None else cfg.val_max_images
    samples = list(samples)[:limit] if limit is not None else list(samples)
    if not samples:
        return
    with_labels = all(s.label is not None for s in samples)
    depth = max(1, min(prefetch, len(samples)))
    device_id = dali_device_id(device)
    dev = torch.device("cpu") if device_id is None else torch.device("cuda", device_id)
    pipe = val_pipeline(with_labels=with_labels, decoder="cpu" if device_id is None else "mixed",
                        mean=cfg.mean, std=cfg.std, lut=info.label_lut, image_dtype=types.FLOAT,
                        label_dtype=types.INT64, batch_size=1,
                        num_threads=num_threads or _default_threads(cfg), device_id=device_id,
                        prefetch_queue_depth=depth)
    pipe.build()
    fed: collections.deque = collections.deque()
    it = iter(samples)

    def feed() -> bool:
        s = next(it, None)
        if s is None:
            return False
        hs: HostSample = prepare_sample(s.image, s.label if with_labels else None,
                                        info.num_classes, info.ignore_index)
        pipe.feed_input("images", [hs.image])
        if with_labels:
            pipe.feed_input("labels", [hs.label])
        fed.append(s)
        return True

    try:
        for _ in range(depth):
            feed()
        pipe.schedule_run()  # the first call runs `depth` iterations
        for i in range(len(samples)):
            stream = torch.cuda.current_stream(dev) if device_id is not None else None
            try:
                outs = pipe.share_outputs(stream) if stream is not None else pipe.share_outputs()
            except Exception as e:  # noqa: BLE001
                found = find_bad_file(list(fed), info.label_lut, info.num_classes,
                                      info.ignore_index)
                raise (found or DataError(f"DALI failed on {fed[0].image}: {e}")) from None
            s = fed.popleft()
            img_t = outs[0].as_tensor()
            img = torch.empty(img_t.shape(), dtype=torch.float32, device=dev)
            feed_ndarray(img_t, img, cuda_stream=stream)
            lab = None
            if with_labels:
                lab_t = outs[1].as_tensor()
                lab = torch.empty(lab_t.shape(), dtype=torch.int64, device=dev)
                feed_ndarray(lab_t, lab, cuda_stream=stream)
                if device_id is None:
                    check_label_batch(lab.numpy(), [s], info.num_classes, info.ignore_index)
            pipe.release_outputs()
            if i + depth < len(samples):
                feed()
                pipe.schedule_run()
            yield img, lab, s.id
    finally:
        del pipe
