"""CogACT: a VLM (DINOv2+SigLIP -> projector -> Llama-2) whose cognition feature conditions a DiT action head.

Top-level module names (vision_backbone, projector, llm_backbone, action_model[, ema_diffusion]) are the keys of the
official checkpoint's "model" dict, so `models.cogact.official` loads it strictly.
"""

from __future__ import annotations

import copy

import torch

from models.cogact.action_model import ActionModel
from models.cogact.vlm import PrismaticPolicy


class CogACT(PrismaticPolicy):
    """Sub-module settings are the keyword arguments of DinoSigLIPBackbone, LlamaBackbone and ActionModel.

    repeated_diffusion_steps: noise draws per sample in the loss (CogACT's model class: 4; its
    training recipe and conf/model/cogact.yaml: 8). cfg_scale: classifier-free guidance
    at inference (1.0 disables it). ddim_steps: DDIM sampling steps. use_ema: keep an EMA copy of the action head
    (`ema_diffusion`) and sample with it. pretrained: an official CogACT checkpoint (Hub id or local run dir).
    proprio_dim: when set, the normalized proprio state [S] (batch["state"]) is an input; official CogACT has none
    (null). proprio_input says how it enters: "add" through `proprio_projector`, a zero-initialised linear map added
    to the cognition feature (one condition token for the DiT), or "token" as a DiT input token of its own
    (`action_model.net.state_embedder`, an MLP), which the action tokens attend to directly.
    aux_dim: when set, `aux_head` (an MLP) predicts the frame's normalized auxiliary target [K] (batch["aux"], e.g.
    the task objects' positions) from the cognition feature, and aux_loss_weight * its MSE joins the loss: a training
    signal that makes the VLM locate what the actions depend on.
    aux_condition: also feed that prediction (detached: the aux loss alone trains it) to the DiT, so the action head
    reads the objects' estimated positions beside the tcp's instead of decoding them from the cognition feature:
    through `aux_projector`, a zero-initialised linear map added to the condition like the proprio state, or with
    proprio_input="token" as part of the state token's input.
    Training and inference both use the model's own estimate; the recorded positions are never an input.
    wrist_image: also read the wrist camera (PrismaticPolicy).
    """

    derived_state_prefixes = ("ema_diffusion.",)

    # The action head's class: another objective over the same DiT (models/flow.py) swaps only this.
    head_class: type[ActionModel] = ActionModel

    def __init__(
        self,
        vision_backbone: dict,
        llm_backbone: dict,
        action_model: dict,
        image_size: int = 224,
        action_dim: int = 7,
        future_action_window_size: int = 15,
        repeated_diffusion_steps: int = 4,
        cfg_scale: float = 1.5,
        ddim_steps: int = 10,
        use_ema: bool = False,
        ema_decay: float = 0.9999,
        gradient_checkpointing: bool = False,
        pretrained: str | None = None,
        proprio_dim: int | None = None,
        proprio_input: str = "add",
        aux_dim: int | None = None,
        aux_loss_weight: float = 1.0,
        aux_condition: bool = False,
        wrist_image: bool = False,
    ) -> None:
        super().__init__(
            vision_backbone,
            llm_backbone,
            image_size,
            action_dim,
            future_action_window_size,
            gradient_checkpointing,
            wrist_image,
        )
        self.repeated_diffusion_steps = repeated_diffusion_steps
        self.cfg_scale = cfg_scale
        self.ddim_steps = ddim_steps
        self.ema_decay = ema_decay
        if proprio_input not in ("add", "token"):
            raise ValueError(f"model.proprio_input must be 'add' or 'token', got {proprio_input!r}")
        self.proprio_dim = proprio_dim
        self.state_token = bool(proprio_dim) and proprio_input == "token"
        self.action_model = self.head_class(
            condition_size=self.llm_backbone.hidden_size,
            action_dim=action_dim,
            future_action_window_size=future_action_window_size,
            state_dim=(proprio_dim + (aux_dim or 0) * aux_condition) if self.state_token else None,
            **action_model,
        )
        diffusion = getattr(self.action_model, "diffusion", None)
        if diffusion is not None:
            diffusion.ddim_timesteps(ddim_steps)  # refuses, now rather than at the first sample, a count it cannot make
        self.proprio_projector = None
        if proprio_dim and not self.state_token:
            self.proprio_projector = torch.nn.Linear(proprio_dim, self.llm_backbone.hidden_size)
            torch.nn.init.zeros_(self.proprio_projector.weight)
            torch.nn.init.zeros_(self.proprio_projector.bias)
        self.aux_dim, self.aux_loss_weight = aux_dim, aux_loss_weight
        self.aux_head = None
        if aux_dim:
            width = self.llm_backbone.hidden_size
            self.aux_head = torch.nn.Sequential(
                torch.nn.Linear(width, width), torch.nn.GELU(), torch.nn.Linear(width, aux_dim)
            )
        if aux_condition and not aux_dim:
            raise ValueError("model.aux_condition feeds the aux head's prediction to the DiT: it needs model.aux_dim")
        self.aux_condition = aux_condition
        self.aux_projector = None
        if aux_condition and not self.state_token:
            self.aux_projector = torch.nn.Linear(aux_dim, self.llm_backbone.hidden_size)
            torch.nn.init.zeros_(self.aux_projector.weight)
            torch.nn.init.zeros_(self.aux_projector.bias)
        self.ema_diffusion = None
        if use_ema:
            self.ema_diffusion = copy.deepcopy(self.action_model).requires_grad_(False)
        if pretrained:
            from models.cogact.official import load_official_weights

            load_official_weights(self, pretrained)

    def released_statistics(self, pretrained: str) -> dict:
        """An official run dir's dataset_statistics.json (CogACT-Base: fractal20220817_data, bridge_orig)."""
        from datasets.statistics import load_statistics

        if self.proprio_dim or self.aux_dim:
            raise ValueError(
                "model.proprio_dim / aux_dim add modules the official CogACT weights lack: they would be random"
            )
        from models.cogact.official import resolve_run_dir

        return load_statistics(resolve_run_dir(pretrained))

    @property
    def sampling_steps(self) -> int:
        """Steps of the head's sampler at inference (CogACT: DDIM steps)."""
        return self.ddim_steps

    @property
    def device(self) -> torch.device:
        return self.action_model.net.positional_embedding.device

    def cognition_features(
        self, images: torch.Tensor, prompts: list[str], wrist_images: torch.Tensor | None = None
    ) -> torch.Tensor:
        """images uint8 [B, S, S, 3] (and wrist_images, for a model that reads them), prompts -> the last-layer hidden
        state at the cognition token [B, 1, D], in float32 (what the head and its projections read, whatever the
        LLM's dtype)."""
        hidden, last = self.hidden_states(self.image_patches(images, wrist_images), prompts)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last].unsqueeze(1).float()

    def condition(
        self,
        images: torch.Tensor,
        prompts: list[str],
        states: torch.Tensor | None,
        wrist_images: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The DiT's condition [B, 1, D]: the cognition feature, plus the projected proprio state and the projected
        object-position estimate when they are added to it (proprio_input="add"). A head with a state token reads
        more than this: use head_inputs()."""
        if self.state_token:
            raise ValueError('with model.proprio_input="token" the DiT also reads a state token: use head_inputs()')
        cognition = self.cognition_features(images.to(self.device), prompts, wrist_images)
        return self.head_inputs(cognition, states)[0]

    def head_inputs(
        self, cognition: torch.Tensor, states: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """What the action head reads, for training and inference alike: (the condition [B, 1, D]; the state token's
        input [B, S (+ K)] or None; the aux head's prediction [B, K] or None). With aux_condition the prediction,
        detached, is added to the condition through aux_projector, or with proprio_input="token" joins the state
        token's input, where one linear map gives object-minus-tcp offsets."""
        states = self._states(states, len(cognition))
        predicted = None if self.aux_head is None else self.aux_head(cognition[:, 0])
        condition, token = cognition, states if self.state_token else None
        if self.proprio_projector is not None:
            condition = condition + self.proprio_projector(states.to(condition.dtype)).unsqueeze(1)
        if self.aux_projector is not None:
            condition = condition + self.aux_projector(predicted.detach()).unsqueeze(1)
        if self.aux_condition and self.state_token:
            token = torch.cat([token, predicted.detach().to(token.dtype)], dim=-1)
        return condition, token, predicted

    def _states(self, states: torch.Tensor | None, batch_size: int) -> torch.Tensor | None:
        """The normalized proprio states [B, S] on the model's device, checked; None for a model without."""
        if not self.proprio_dim:
            return None
        if states is None:
            raise ValueError(
                f"this model takes a proprio state of {self.proprio_dim} values (model.proprio_dim) and got none: "
                f"the dataset needs a state_key, and clients must send the robot's observation_keys.state"
            )
        if states.shape != (batch_size, self.proprio_dim):
            raise ValueError(f"states are {list(states.shape)}, the model expects [batch, {self.proprio_dim}]")
        return states.to(self.device, torch.float32)

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        actions = batch["action"].to(self.device)
        self.check_actions(actions)
        cognition = self.cognition_features(batch["image"].to(self.device), batch["prompt"], batch.get("wrist_image"))
        condition, token, predicted = self.head_inputs(cognition, batch.get("state"))
        repeats = self.repeated_diffusion_steps
        token = None if token is None else token.repeat(repeats, 1)
        loss = self.action_model.loss(actions.repeat(repeats, 1, 1), condition.repeat(repeats, 1, 1), token)
        if predicted is None:
            return loss, {"loss": loss.detach()}
        aux_loss = torch.nn.functional.mse_loss(predicted.float(), self._aux_target(batch, len(predicted)))
        # "loss" stays the action loss (validation and the best checkpoint compare it across models).
        return loss + self.aux_loss_weight * aux_loss, {"loss": loss.detach(), "aux_loss": aux_loss.detach()}

    def _aux_target(self, batch: dict, batch_size: int) -> torch.Tensor:
        if "aux" not in batch:
            raise ValueError(
                f"model.aux_dim={self.aux_dim} needs an auxiliary target in every batch: set the dataset "
                "source's aux_key (e.g. observation/object_pos), or model.aux_dim=null"
            )
        target = batch["aux"].to(self.device, torch.float32)
        if target.shape != (batch_size, self.aux_dim):
            raise ValueError(f"aux targets are {list(target.shape)}, the model expects [batch, {self.aux_dim}]")
        return target

    @torch.no_grad()
    def on_optimizer_step(self) -> None:
        if self.ema_diffusion is None:
            return
        for ema, live in zip(self.ema_diffusion.parameters(), self.action_model.parameters(), strict=True):
            ema.lerp_(live.detach().to(ema.dtype), 1 - self.ema_decay)

    @torch.no_grad()
    def predict_normalized(
        self,
        images: torch.Tensor,
        prompts: list[str],
        states: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        wrist_images: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Normalized action chunks [B, T, A]; states are normalized proprio [B, S] (used when proprio_dim is set)."""
        cognition = self.cognition_features(images.to(self.device), prompts, wrist_images)
        condition, token, _ = self.head_inputs(cognition, states)
        head = self.ema_diffusion if self.ema_diffusion is not None else self.action_model
        return head.sample(condition, self.cfg_scale, self.sampling_steps, generator=generator, state=token)

    def metadata(self) -> dict:
        return {
            **super().metadata(),
            "cfg_scale": self.cfg_scale,
            "ddim_steps": self.ddim_steps,
        }
