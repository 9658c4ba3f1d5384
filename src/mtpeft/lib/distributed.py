"""Training on several processes: DDP (torchrun, ``accelerate launch``, Ray Train) and FSDP2.

DDP through the pipeline needs nothing from the user: ``torchrun --nproc_per_node=N -m mtpeft train
CONFIG`` runs :func:`mtpeft.app.pipeline.train_run` in every process, which

* joins the process group the launcher describes (:func:`init_distributed`; gloo on CPU, nccl on GPU);
* keeps ``train.batch_size`` the *global* batch: each process gets ``batch_size / world``
  (:func:`per_device_batch_size`). The Trainer's DataLoader goes through ``accelerate``, which wraps
  our (plain) :class:`~mtpeft.app.data.MultiTaskSampler` in a ``BatchSamplerShard``: process ``r`` takes
  batches ``r, r + N, r + 2N, ...`` of the one global stream, so an optimizer step sees exactly the
  ``batch_size`` examples that a single process would see, split between the ranks;
* wraps the model in DDP *without* ``find_unused_parameters``: every adapter parameter takes part in
  every forward (experts and tasks are stacked tensors, indexed or gated as a whole, so an expert or
  a task that gets no token in a step receives a zero gradient, not none);
* saves checkpoints and the final adapter from rank 0 only, loads them in every rank.

FSDP2 (``torch.distributed.fsdp.fully_shard``) is for custom training loops; see docs/distributed.md.
The helpers here cover what adapters add to the usual recipe: build base + adapters on the meta
device, shard (:func:`shard_model`), materialise (:func:`materialize_sharded`: base weights from a full
state dict, adapters initialised by their own ``reset_parameters()``), and save / load adapters from
sharded parameters (:func:`save_adapter`, :func:`load_adapter_weights`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "world_size", "rank", "local_rank", "is_main_process", "is_distributed", "default_backend",
    "init_distributed", "destroy_distributed", "barrier", "main_process_first", "per_device_batch_size", "unwrap_model",
    "rank_batch_sampler", "shard_model", "materialize_sharded", "full_adapter_state_dict",
    "save_adapter", "load_adapter_weights",
]


# ----------------------------------------------------------------------------------- who am I
def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Processes in the job: the process group's size, else ``$WORLD_SIZE`` (set by every launcher), else 1."""
    return dist.get_world_size() if _initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's global rank (0 when not distributed)."""
    return dist.get_rank() if _initialized() else int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """This process's rank on its node (which GPU it drives)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    return rank() == 0


def is_distributed() -> bool:
    return world_size() > 1


def default_backend() -> str:
    """nccl when the processes drive GPUs, gloo on CPU."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(backend: str | None = None) -> bool:
    """Join the process group that the launcher (torchrun, accelerate launch, Ray Train) describes in
    the environment; a no-op when already joined or when the job has one process.

    Returns True when training is distributed. ``accelerate`` (inside the HF Trainer) reuses this
    group rather than creating its own.
    """
    if world_size() <= 1:
        return False
    if not _initialized():
        backend = backend or default_backend()
        if "nccl" in backend:
            torch.cuda.set_device(local_rank())
        dist.init_process_group(backend=backend)
    return True


def _clear_dtensor_caches() -> None:
    """Empty DTensor's process-wide caches. Each keeps ``DeviceMesh`` objects (keys or values), and a
    DeviceMesh keeps its process groups (``DeviceMesh._pg_registry``): with them filled, a gloo group
    outlives ``destroy_process_group()`` and its worker threads run on into interpreter shutdown.
    Private torch names, looked up one by one: one that a torch version lacks is simply not there."""
    import importlib

    caches = [
        ("torch._C", "_clear_DTensor_sharding_propagator_cache", None),
        ("torch.distributed.tensor._redistribute", "clear_redistribute_planner_cache", None),
        ("torch.distributed.tensor._redistribute", "_gen_transform_infos", "cache_clear"),
        ("torch.distributed.tensor._collective_utils", "MeshTopoInfo", "build_from_mesh.cache_clear"),
    ]
    for module, name, method in caches:
        try:
            target = getattr(importlib.import_module(module), name)
            for attr in (method.split(".") if method else []):
                target = getattr(target, attr)
        except (ImportError, AttributeError):
            continue
        target()
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return
    propagator = DTensor._op_dispatcher.sharding_propagator
    for name in ("propagate_op_sharding", "_propagate_tensor_meta_cached"):
        clear = getattr(getattr(propagator, name, None), "cache_clear", None)
        if clear is not None:
            clear()  # propagate_op_sharding's cache is per thread: this is the calling thread's


def destroy_distributed() -> None:
    """Leave the process group at the end of a job so that its threads are stopped before Python exits.

    ``dist.destroy_process_group()`` alone unregisters the groups, but a gloo group's object, and its
    worker threads (``pt_gloo_runloop``) and socket loop (``gloo_tcp_loop``), live on while anything
    references it: a DDP or FSDP2 model, a DTensor, or DTensor's own caches of device meshes. They then
    die during interpreter shutdown, and a gloo thread that drops the last reference to a tensor there
    needs the GIL, which a finalising interpreter no longer gives: the thread is unwound
    (``terminate called without an active exception``, SIGABRT), depending on thread timing, so mostly
    under load. Drop your models first (let them go out of scope); this then waits for every rank
    (no rank leaves while a peer still talks to it), empties the DTensor caches, collects the
    reference cycles of the dropped models and destroys the groups, which joins their threads once
    nothing else holds them (tests/dist_worker.py checks that for FSDP2; DDP's C++ reducer may keep
    a group alive longer). No-op when no process group exists.
    """
    import gc

    if not _initialized():
        return
    barrier()
    _clear_dtensor_caches()
    gc.collect()
    dist.destroy_process_group()
    gc.collect()


def barrier() -> None:
    """Wait for every process (no-op when not distributed)."""
    if _initialized() and dist.get_world_size() > 1:
        dist.barrier()


@contextlib.contextmanager
def main_process_first():
    """Run the block on rank 0 first, then on the other ranks: one process fills caches (data set
    downloads, ``datasets`` cache files) and the others then read them."""
    if not is_main_process():
        barrier()
    try:
        yield
    finally:
        if is_main_process():
            barrier()


def per_device_batch_size(global_batch_size: int, world: int | None = None) -> int:
    """The batch each process takes so that one optimizer step sees ``global_batch_size`` examples."""
    world = world_size() if world is None else world
    if global_batch_size % world:
        raise ValueError(
            f"train.batch_size={global_batch_size} is the global batch of one optimizer step and must be "
            f"divisible by the number of processes ({world}); use e.g. train.batch_size="
            f"{max(world, global_batch_size // world * world)}.")
    return global_batch_size // world


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DDP / ``torch.compile`` wrappers (FSDP2 does not wrap: it returns the module)."""
    from .model import MultiTaskModel

    while not isinstance(model, MultiTaskModel):
        # _modules, not getattr: MultiTaskModel forwards unknown attributes to the base model
        inner = model._modules.get("module")  # DDP, DataParallel
        if inner is None:
            inner = model._modules.get("_orig_mod")  # torch.compile
        if inner is None:
            return model
        model = inner
    return model


def rank_batch_sampler(sampler, per_device_batch_size: int, *, process_index: int | None = None,
                       num_processes: int | None = None):
    """For custom loops: this rank's batches of ``sampler``'s global stream, exactly as the Trainer
    (accelerate) splits it: batch ``i`` of size ``per_device_batch_size`` goes to rank ``i % N``.
    Pass it to ``DataLoader(dataset, batch_sampler=...)``."""
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler

    num_processes = world_size() if num_processes is None else num_processes
    process_index = rank() if process_index is None else process_index
    return BatchSamplerShard(BatchSampler(sampler, per_device_batch_size, drop_last=False),
                             num_processes=num_processes, process_index=process_index, split_batches=False,
                             even_batches=True)


# ----------------------------------------------------------------------------------- FSDP2
def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return False
    return isinstance(t, DTensor)


def _adapter_model(model: nn.Module):
    inner = unwrap_model(model)
    if not hasattr(inner, "adapted_layers"):
        raise TypeError(f"expected an mtpeft MultiTaskModel (or DDP around one), got {type(inner).__name__}.")
    return inner


def shard_model(model: nn.Module, block_classes: Iterable[type | str] | None = None, *, mesh=None,
                reshard_after_forward: bool = True, **fully_shard_kwargs) -> nn.Module:
    """FSDP2: ``fully_shard`` every transformer block, then the whole model (the usual recipe).

    ``block_classes``: classes or class names of the blocks to shard separately; by default the
    wrapped Hugging Face model's ``_no_split_modules`` (e.g. ``LlamaDecoderLayer``). The adapters live
    inside the blocks and are sharded with them; frozen and trainable parameters may share a block.
    """
    from torch.distributed.fsdp import fully_shard

    inner = _adapter_model(model)
    if block_classes is None:
        found = None
        for module in inner.base_model.modules():
            found = getattr(module, "_no_split_modules", None)
            if found:
                break
        if not found:
            raise ValueError("could not find the model's transformer block class (_no_split_modules); pass "
                             "block_classes=[MyBlock].")
        block_classes = found
    wanted = list(block_classes)
    names = {c for c in wanted if isinstance(c, str)}
    types = tuple(c for c in wanted if isinstance(c, type))
    kwargs = dict(mesh=mesh, reshard_after_forward=reshard_after_forward, **fully_shard_kwargs)
    blocks = [m for m in inner.base_model.modules() if isinstance(m, types) or type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"no module of the model is one of {sorted(map(str, wanted))}.")
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(inner, **kwargs)
    return model


@torch.no_grad()
def _reset_adapter_layer(layer) -> None:
    """``layer.reset_parameters()`` on full-size temporaries, then keep this rank's shard.

    Calling ``reset_parameters()`` on the sharded DTensors directly would draw each shard from the
    local generator: on CPU (no DTensor RNG) every rank draws the *same* numbers, so the shards of a
    LoRA A would repeat each other (rank r acting like r / world). Drawing the full tensor with the
    same seed on every rank gives the unsharded initialisation exactly, on any device.
    """
    from torch.distributed.tensor import distribute_tensor

    owned = {n: p for n, p in layer.named_parameters(recurse=False)}
    sharded = {n: p for n, p in owned.items() if _is_dtensor(p)}
    if not sharded:
        layer.reset_parameters()
        return
    for name, param in sharded.items():
        full = torch.empty(param.shape, dtype=param.dtype, device=param.to_local().device)
        layer._parameters[name] = nn.Parameter(full, requires_grad=param.requires_grad)
    try:
        layer.reset_parameters()
        fresh = {n: layer._parameters[n] for n in sharded}
    finally:
        for name, param in sharded.items():
            layer._parameters[name] = param
    for name, param in sharded.items():
        local = distribute_tensor(fresh[name].data, param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().copy_(local.to_local())


def _base_key_map(model) -> dict[str, str]:
    """Base-model state-dict key -> key in the wrapped model (adapted layers hold the original layer
    as ``<name>.base_layer``)."""
    inner = _adapter_model(model)
    mapping = {}
    for key in list(inner.base_model.state_dict(keep_vars=True).keys()):
        plain = key.replace(".base_layer.", ".")
        mapping[plain] = key
    return mapping


@torch.no_grad()
def materialize_sharded(model: nn.Module, device: torch.device | str, base_state_dict: Mapping | None = None,
                        *, strict: bool = True) -> nn.Module:
    """Allocate a model built on the meta device (and sharded), fill the base weights from a *full*
    state dict of the bare base model (same on every rank; non-persistent buffers such as rotary
    ``inv_freq`` may be included), and initialise every adapter with its ``reset_parameters()``.

    Seed the RNG identically on every rank before calling: the adapters then equal the unsharded
    initialisation with that seed.
    """
    from torch.distributed.tensor import distribute_tensor

    inner = _adapter_model(model)
    inner.to_empty(device=device)
    if base_state_dict is not None:
        key_map = _base_key_map(inner)
        targets = dict(inner.base_model.named_parameters())
        targets.update(dict(inner.base_model.named_buffers()))
        seen = set()
        for key, value in base_state_dict.items():
            name = key_map.get(key, key)
            target = targets.get(name)
            if target is None:
                if strict:
                    raise KeyError(f"base weight {key!r} has no place in the wrapped model.")
                continue
            value = value.to(device=target.device if not _is_dtensor(target) else target.to_local().device,
                             dtype=target.dtype)
            if _is_dtensor(target):
                value = distribute_tensor(value, target.device_mesh, target.placements, src_data_rank=None)
            target.copy_(value)
            seen.add(name)
        if strict:
            # modules_to_save (role "saved") are base modules: they come from the state dict too
            adapter = {n for n in targets if inner.parameter_role("base_model." + n) not in (None, "saved")}
            missing = sorted(n for n in dict(inner.base_model.named_parameters()) if n not in seen
                             and n not in adapter)
            if missing:
                raise KeyError(f"{len(missing)} base parameters were not in the state dict, e.g. {missing[:3]}.")
    for _, layer in inner.adapted_layers():
        _reset_adapter_layer(layer)
    return model


def full_adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the adapter tensors, full (unsharded) and on the CPU. Collective under FSDP2: call it
    on every rank."""
    state = _adapter_model(model).adapter_state_dict()
    return {k: (v.full_tensor() if _is_dtensor(v) else v).detach().to("cpu", copy=True) for k, v in state.items()}


class _GatheredAdapter:
    """What :func:`mtpeft.lib.io.save_adapter` reads from a model (config and adapter tensors), with the
    tensors already gathered."""

    def __init__(self, config, tensors: dict[str, torch.Tensor]):
        self.config, self._tensors = config, tensors

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        return self._tensors


def save_adapter(model: nn.Module, path) -> None:
    """Save the adapter (``adapter_config.json`` + ``adapter_model.safetensors``) from rank 0.

    Works for a plain, DDP-wrapped or FSDP2-sharded model; call it on every rank (the shards are
    gathered collectively); only rank 0 writes, and every rank returns once the files exist.
    """
    from .io import save_adapter as write_adapter

    inner = _adapter_model(model)
    tensors = full_adapter_state_dict(inner)
    if is_main_process():
        write_adapter(_GatheredAdapter(inner.config, tensors), Path(path))
    barrier()


@torch.no_grad()
def load_adapter_weights(model: nn.Module, path) -> None:
    """Load a saved adapter into a plain, DDP-wrapped or FSDP2-sharded model, on every rank: each
    rank reads the file and keeps its own shard (no communication)."""
    from torch.distributed.tensor import distribute_tensor

    from . import io

    inner = _adapter_model(model)
    params = dict(inner.named_parameters())
    if not any(_is_dtensor(p) for p in params.values()):
        io.load_adapter_weights(inner, path)
        return
    config = io.read_adapter_config(path)
    mine, theirs = inner.config.to_dict(), config.to_dict()
    differ = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
    if differ:
        raise io.AdapterFileError(f"{path} was saved with another adapter config (fields {differ} differ).")
    tensors = io.read_adapter_tensors(path)
    io.check_tensors_fit(inner, tensors, path)
    for key, value in tensors.items():
        param = params[f"base_model.{key}"]
        if _is_dtensor(param):
            local = distribute_tensor(value.to(param.dtype), param.device_mesh, param.placements,
                                      src_data_rank=None).to_local()
            param.to_local().copy_(local.to(param.to_local().device))
        else:
            param.copy_(value.to(device=param.device, dtype=param.dtype))
