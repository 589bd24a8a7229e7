"""The nnU-Net seam, implemented once. Each backbone trainer sets two class attributes.

- ``build_network_architecture``: a pure function of the plans (nnU-Net calls it on the class at
  inference with deep supervision off, then loads strictly), building the registered backbone with
  the plans' strides, kernel sizes and patch.
- deep-supervision scales from the network's real strides, and a loss wrapper that insists on as many
  outputs as targets.
- Dice/CE weights from a schedule, set at the start of every epoch from ``current_epoch`` (never at
  construction: ``--c`` builds the loss before it loads the checkpoint).
- short budgets through the stock CLI via environment variables (``NNUNET_LK_EPOCHS`` ...), recorded
  in the checkpoint so that ``--c`` continues the same schedule.
- checkpoints written to a temporary file and renamed, so a crash never leaves a half-written one.
"""
from __future__ import annotations

import os
import sys
from typing import Optional

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch._dynamo import OptimizedModule
from torch._dynamo.exc import TorchDynamoException
from torch.nn.parallel import DistributedDataParallel as DDP

from ..losses.scheduled import StrictDeepSupervisionWrapper, apply_loss_weights
from ..losses.schedules import get_schedule, progress
from ..networks import build_backbone, get_backbone
from ..errors import NetworkConfigError
from ..checkpoints import RESUME_ORDER, read_checkpoint
from .. import settings
from ..plans import backbone_options, configuration_strides, plans_use, validate_configuration
from .recipes import NNUNET, RecipeLRScheduler, make_optimizer, paper_recipe, resolve_recipe, saved_recipe
from .run_settings import RunSettingsMixin, apply_thread_budget

def unwrap_network(network: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside DDP and/or torch.compile wrappers."""
    if isinstance(network, DDP):
        network = network.module
    if isinstance(network, OptimizedModule):
        network = network._orig_mod
    return network


def _root_cause(error: BaseException) -> BaseException:
    """The backend's own exception inside torch.compile's wrappers."""
    inner = getattr(error, "inner_exception", None) or error.__cause__
    return error if inner is None else _root_cause(inner)


class nnUNetTrainerLK(RunSettingsMixin, nnUNetTrainer):
    """Base of every nnunet-lk trainer. Subclasses set ``backbone`` (a registry name) and optionally
    ``loss_schedule`` / ``loss_schedule_params``, and ``recipe`` ("paper": the optimiser and learning-rate
    schedule of the backbone's paper or official code; "nnunet": nnU-Net's own; None: the backbone's default,
    its paper recipe where one is published; ``training/recipes.py``)."""

    backbone: Optional[str] = None
    loss_schedule: str = "sigmoid"
    loss_schedule_params: dict = {}
    recipe: Optional[str] = None

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        if self.backbone is None:
            raise TypeError(f"{type(self).__name__} names no backbone; use one of the nnUNetTrainer<Backbone> "
                            f"classes (`nnunet-lk list`)")
        # Fail now, before any data is loaded, if these plans cannot build this backbone.
        validate_configuration(plans, configuration)
        super().__init__(plans, configuration, fold, dataset_json, device)
        spec, dim = get_backbone(self.backbone), len(self.configuration_manager.patch_size)
        problem = spec.dimension_problem(dim)
        if problem:
            raise NetworkConfigError(f"{type(self).__name__} trains {problem} ({configuration!r}): "
                                     f"{spec.dimension_fix()}.")
        self._schedule = get_schedule(self.loss_schedule, **self.loss_schedule_params)
        self._use_recipe(resolve_recipe(self.backbone, dim, self.recipe))  # fails now if there is none
        self.apply_run_settings()

    def _do_i_compile(self) -> bool:
        style = backbone_options(self.configuration_manager, self.backbone).get("checkpoint_style", "off")
        if style != "off" and super()._do_i_compile():
            # dynamo cannot trace a checkpoint whose recomputation restores BatchNorm statistics
            self.print_to_log_file(f"{self.backbone}: checkpoint_style={style}: torch.compile is not used with "
                                   f"activation checkpointing; this network trains eagerly.")
            return False
        return super()._do_i_compile()

    def on_train_start(self):
        if self.device.type == "cuda" and self.local_rank == 0:
            self._warn_if_memory_short()
        super().on_train_start()  # initialises the network
        self.print_to_log_file(plans_use(self.configuration_manager, self.backbone, unwrap_network(self.network),
                                         self.device.type))

    def _warn_if_memory_short(self) -> None:
        """Before anything is allocated: the estimate against the GPU's free memory, and plans that fit."""
        from ..memory.planner import memory_warning
        free, _total = torch.cuda.mem_get_info(self.device)
        message = memory_warning(type(self), self.plans_manager.plans, self.dataset_json, self.configuration_name,
                                 free, dataset=self.plans_manager.dataset_name, plans_name=self.plans_manager.plans_name)
        if message:
            self.print_to_log_file(message)
            print(message, file=sys.stderr, flush=True)

    # ---- network ---------------------------------------------------------------------------------
    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> torch.nn.Module:
        # A classmethod is called on the class just like nnU-Net's staticmethod (no instance state),
        # and lets each subclass name its backbone.
        apply_thread_budget()  # nnUNetv2_predict has just set torch to every core; this is our one hook
        strides, kernel_sizes = configuration_strides(configuration_manager)
        dim = len(configuration_manager.patch_size)
        return build_backbone(cls.backbone, dim=dim, input_channels=num_input_channels,
                              num_classes=num_output_channels, strides=strides, kernel_sizes=kernel_sizes,
                              patch_size=configuration_manager.patch_size,
                              deep_supervision=enable_deep_supervision,
                              **backbone_options(configuration_manager, cls.backbone))

    def _get_deep_supervision_scales(self):
        if not self.enable_deep_supervision:
            return None
        network = unwrap_network(self.network)
        scales = network.deep_supervision_scales
        heads = len(network.decoder.seg_layers)
        if len(scales) != heads:
            raise RuntimeError(f"{self.backbone}: {heads} deep-supervision heads but {len(scales)} scales")
        if len(scales) < 2:  # nnU-Net weights the lowest output 0 and normalises: one output gives 0 / 0 = NaN
            from ..patch_sizes import smallest_working_patch
            patch = list(self.configuration_manager.patch_size)
            raise NetworkConfigError(
                f"{type(self).__name__}: {self.backbone} has {len(network.level_strides)} level(s) on these plans "
                f"(patch {patch}, {len(self.configuration_manager.pool_op_kernel_sizes)} stages), so "
                f"{len(scales)} deep-supervision output; nnU-Net's loss needs at least 2 (it would weight a single "
                f"one 0 / 0 and stop with a NaN loss). Use a larger patch, e.g. `nnunet-lk plans ... --patch "
                f"{' '.join(map(str, smallest_working_patch(self.configuration_manager.spacing, patch)))}`, or "
                f"more levels in this backbone's options.")
        return scales

    def _build_loss(self):
        loss = super()._build_loss()
        if self.enable_deep_supervision:
            loss = StrictDeepSupervisionWrapper(loss.loss, loss.weight_factors)
        return loss

    def configure_optimizers(self):
        if self._recipe is None:
            self.print_to_log_file(f"Training recipe (nnunet): {NNUNET.optimizer}, lr {NNUNET.lr}, weight decay "
                                   f"{NNUNET.weight_decay}, {NNUNET.schedule} schedule ({NNUNET.source})")
            return super().configure_optimizers()
        optimizer = make_optimizer(self._recipe, self.network.parameters())
        self.print_to_log_file(f"Training recipe (paper): {self._recipe.optimizer}, lr {self._recipe.lr}, "
                               f"weight decay {self._recipe.weight_decay}, {self._recipe.schedule} schedule "
                               f"({self._recipe.source})")
        return optimizer, RecipeLRScheduler(optimizer, self._recipe, lambda: self.num_epochs)

    # ---- loss schedule ---------------------------------------------------------------------------
    def loss_weights_for_epoch(self, epoch: int):
        return self._schedule(progress(epoch, self.num_epochs))

    def on_train_epoch_start(self):
        self._iteration = 0
        super().on_train_epoch_start()
        weights = self.loss_weights_for_epoch(self.current_epoch)
        apply_loss_weights(self.loss, weights)
        self.print_to_log_file(f"Loss weights ({self.loss_schedule} schedule, epoch {self.current_epoch} of "
                               f"{self.num_epochs}): dice {weights.dice:.4f}, ce {weights.ce:.4f}")

    # ---- training steps: torch.compile and mixed precision turn themselves off when they fail -----
    def train_step(self, batch: dict) -> dict:
        self._iteration = getattr(self, "_iteration", 0) + 1
        network = unwrap_network(self.network)
        mixed_precision = self.grad_scaler is not None and not network.full_precision
        # BatchNorm statistics of a step that overflows in fp16 are poisoned; the grad scaler already skips
        # its weight update, so keeping these lets the step be redone in float32 as if nothing happened.
        buffers = [b.detach().clone() for b in network.buffers()] if mixed_precision else None
        result = self._compiled_or_eager(super().train_step, batch)
        if mixed_precision and self._any_rank(not np.isfinite(result["loss"]).all()):
            for saved, buffer in zip(buffers, network.buffers()):
                buffer.copy_(saved)
            network.full_precision = True
            self.print_to_log_file(
                f"{self.backbone}: the loss was {result['loss']} in mixed precision (epoch {self.current_epoch}, "
                f"iteration {self._iteration}); the step was redone in float32 and this network now trains in "
                f"float32 (recorded in its checkpoints, so --c and nnUNetv2_predict keep float32).")
            result = self._compiled_or_eager(super().train_step, batch)
        if not np.isfinite(result["loss"]).all():
            # Stop before on_epoch_end can write a checkpoint with broken weights.
            raise FloatingPointError(self._non_finite_loss_message(result["loss"]))
        return result

    def _non_finite_loss_message(self, loss) -> str:
        """What happened, what is on disk (nothing else is claimed), and the likely causes, none asserted."""
        folder = self.output_folder
        present = [name for name in RESUME_ORDER
                   if os.path.isfile(os.path.join(folder, name))]
        if present:
            disk = (f"Checkpoints in {folder}, written before this step and left untouched: {', '.join(present)}; "
                    f"after removing the cause, `nnUNetv2_train ... --c` resumes from the first of "
                    f"checkpoint_final/latest/best that exists.")
        else:
            disk = (f"No checkpoint has been written to {folder} yet, so there is nothing to resume: after removing "
                    f"the cause, start the training again without --c.")
        patch = list(self.configuration_manager.patch_size)
        return (f"{type(self).__name__}: the training loss is {loss} at epoch {self.current_epoch}, iteration "
                f"{self._iteration}; training stopped before a checkpoint with broken weights could be written. "
                f"{disk} Likely causes (check each): NaN/Inf values in the training images; a learning rate too "
                f"high for this network (initial_lr {self.initial_lr}); a patch too small for the plans' network "
                f"(patch {patch}, {len(self.configuration_manager.pool_op_kernel_sizes)} stages; `nnunet-lk plans "
                f"--patch` refuses those); a corrupted preprocessed case (re-run nnUNetv2_plan_and_preprocess).")

    def _any_rank(self, flag: bool) -> bool:
        """True if ``flag`` is set on any DDP rank (all ranks must redo a step together)."""
        if not self.is_ddp:
            return flag
        flag = torch.tensor(float(flag), device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def validation_step(self, batch: dict) -> dict:
        return self._compiled_or_eager(super().validation_step, batch)

    def _compiled_or_eager(self, step, batch: dict) -> dict:
        """Run ``step``; if torch.compile cannot compile this backbone, train on without it and say so."""
        try:
            return step(batch)
        except TorchDynamoException as error:
            if not self._drop_compilation():
                raise
            cause = _root_cause(error)
            reason = (str(cause).strip().splitlines() or [""])[0][:300]
            self.print_to_log_file(
                f"{self.backbone}: torch.compile failed ({type(error).__name__}: {type(cause).__name__}: {reason}); "
                f"training continues without compilation. Set nnUNet_compile=f to skip the attempt.")
            return step(batch)

    def _drop_compilation(self) -> bool:
        """Replace the compiled network by its eager module (inside DDP if used); False if not compiled."""
        inner = self.network.module if isinstance(self.network, DDP) else self.network
        if not isinstance(inner, OptimizedModule):
            return False
        if isinstance(self.network, DDP):
            self.network = DDP(inner._orig_mod, device_ids=[self.local_rank])
        else:
            self.network = inner._orig_mod
        return True

    # ---- checkpoints -----------------------------------------------------------------------------
    def _budget(self) -> dict:
        return {a: int(getattr(self, a)) for a in settings.BUDGET} | {"loss_schedule": self.loss_schedule,
                                                                 "backbone": self.backbone, "recipe": self.recipe_name}

    def save_checkpoint(self, filename: str) -> None:
        if self.local_rank != 0:
            return
        if self.disable_checkpointing:
            self.print_to_log_file("No checkpoint written, checkpointing is disabled")
            return
        # nnU-Net's checkpoint format, plus our budget so that --c continues the same schedule.
        checkpoint = {
            "network_weights": unwrap_network(self.network).state_dict(),
            "optimizer_state": self.optimizer.state_dict(),
            "grad_scaler_state": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            "logging": self.logger.get_checkpoint(),
            "_best_ema": self._best_ema,
            "current_epoch": self.current_epoch + 1,
            "init_args": self.my_init_kwargs,
            "trainer_name": self.__class__.__name__,
            "inference_allowed_mirroring_axes": self.inference_allowed_mirroring_axes,
            "nnunet_lk": self._budget(),
        }
        # Write beside the target and rename: an interrupted write never replaces a good checkpoint.
        tmp = f"{filename}.tmp"
        torch.save(checkpoint, tmp)
        os.replace(tmp, filename)

    def _use_recipe(self, name: str) -> None:
        """``name``: "paper" or "nnunet"; ``_recipe`` is None for nnU-Net's (its own configure_optimizers)."""
        self.recipe_name = name
        self._recipe = paper_recipe(self.backbone, len(self.configuration_manager.patch_size)) \
            if name == "paper" else None

    def _continue_recipe(self, saved: str) -> None:
        """``--c`` continues a checkpoint with the recipe it was trained with: a plain trainer's folder from before
        the plain trainers defaulted to the paper recipe keeps nnU-Net's."""
        if saved == self.recipe_name:
            return
        self.print_to_log_file(f"Note: this checkpoint was trained with the {saved} recipe; {type(self).__name__} "
                               f"trains with the {self.recipe_name} recipe (the plain trainers default to the paper "
                               f"recipe; checkpoints of theirs from before used nnU-Net's). Continuing with the {saved} "
                               f"recipe, as the run was started; a new run uses the {self.recipe_name} recipe.")
        self._use_recipe(saved)
        if self.was_initialized:  # the optimiser the checkpoint's state belongs to
            self.optimizer, self.lr_scheduler = self.configure_optimizers()

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        if isinstance(filename_or_checkpoint, str):
            checkpoint = read_checkpoint(filename_or_checkpoint)
            saved = checkpoint.get("nnunet_lk", {})
            for attribute in settings.BUDGET:
                if attribute in saved and attribute not in self._budget_from_env:
                    setattr(self, attribute, saved[attribute])
                elif attribute in saved and saved[attribute] != getattr(self, attribute):
                    self.print_to_log_file(f"Note: {settings.BUDGET[attribute]} sets {attribute}={getattr(self, attribute)}"
                                           f" but the checkpoint was trained with {saved[attribute]}; the loss "
                                           f"schedule follows the new value.")
            if saved:  # every nnunet-lk checkpoint has its record
                self._continue_recipe(saved_recipe(saved))
        # nnU-Net 2.8.1's load_checkpoint breaks when given a dict, so it reads the file again (resume only).
        super().load_checkpoint(filename_or_checkpoint)
