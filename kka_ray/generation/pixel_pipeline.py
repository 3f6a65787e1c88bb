"""The project's small text-to-image model ``G`` of Eq. 4 (``x_a = G(t_a)``): a pixel-space diffusion pipeline.

``KKAPixelDiffusionPipeline`` is a diffusers ``DiffusionPipeline`` with four components:

- ``unet``: a diffusers ``UNet2DConditionModel`` that denoises images directly in pixel
  space (no VAE; e.g. 1 x 32 x 32 for Fashion-MNIST-like data), cross-attending to the
  text encoder's token states (``cross_attention_dim`` = the encoder's hidden size);
- ``text_encoder``: a frozen transformers ``BertModel`` (all-MiniLM-L6-v2 by default, 384-d);
- ``tokenizer``: its ``BertTokenizerFast``;
- ``scheduler``: a diffusers scheduler (DDIM or DPM-Solver++ multistep).

``__call__`` is inference only (diffusers style): classifier-free guidance against the
empty-prompt embedding, per-image generators for per-seed determinism, output clamped to
[-1, 1] and returned as PIL ("L" for one channel, "RGB" for three) or as a float array in
[0, 1]. ``save_pretrained`` / ``from_pretrained`` round-trip through ``model_index.json``
and safetensors like any diffusers pipeline. Training it is a separate job.

This module imports torch, diffusers and transformers at the top: import it lazily.
"""

import inspect
import logging

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, UNet2DConditionModel
from diffusers.schedulers import DDIMScheduler, DPMSolverMultistepScheduler
from diffusers.utils.torch_utils import randn_tensor
from transformers import BertModel, BertTokenizerFast

logger = logging.getLogger(__name__)

# Token budget of a description: the describer keeps at most ~200 characters (about 40-50
# word pieces); longer texts are truncated.
DEFAULT_MAX_TEXT_LENGTH = 64
_OUTPUT_TYPES = ("pil", "np", "pt")


def _to_pil(images) -> list:
    """``(B, H, W, C)`` floats in [0, 1] -> PIL images, mode "L" for C = 1 and "RGB" for C = 3."""
    from PIL import Image

    arrays = (images * 255.0).round().astype("uint8")
    return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arrays]


def encode_text(text_encoder, tokenizer, prompts: list[str], max_length: int,
                device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Token states ``(B, max_length, hidden)`` and attention mask ``(B, max_length)``: the prompts
    padded to ``max_length`` (truncated beyond), as the pipeline conditions its UNet; the drawer's
    training encodes its captions with this same function."""
    tokens = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    input_ids = tokens["input_ids"].to(device)
    mask = tokens["attention_mask"].to(device)
    return text_encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state, mask


class KKAPixelDiffusionPipeline(DiffusionPipeline):
    """Text-conditioned pixel-space diffusion: MiniLM token states -> UNet cross-attention -> image."""

    model_cpu_offload_seq = "text_encoder->unet"

    def __init__(
        self,
        unet: UNet2DConditionModel,
        text_encoder: BertModel,
        tokenizer: BertTokenizerFast,
        scheduler: DDIMScheduler | DPMSolverMultistepScheduler,
        max_text_length: int = DEFAULT_MAX_TEXT_LENGTH,
    ):
        super().__init__()
        if unet.config.cross_attention_dim != text_encoder.config.hidden_size:
            raise ValueError(
                f"unet.cross_attention_dim={unet.config.cross_attention_dim} must equal the text encoder's "
                f"hidden_size={text_encoder.config.hidden_size}: build the UNet for this text encoder"
            )
        text_encoder.requires_grad_(False)  # frozen: only the UNet is ever trained
        self.register_modules(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
        self.register_to_config(max_text_length=max_text_length)

    @property
    def image_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def default_size(self) -> tuple[int, int]:
        size = self.unet.config.sample_size
        return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))

    def encode_prompt(self, prompts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Token states ``(B, L, hidden)`` of the text encoder and the attention mask ``(B, L)``."""
        states, mask = encode_text(self.text_encoder, self.tokenizer, prompts, self.config.max_text_length, device)
        return states.to(self.unet.dtype), mask

    def _check_inputs(self, prompts, num_inference_steps, generator, height, width, output_type) -> None:
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompt must be a string or a non-empty list of strings")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if isinstance(generator, list) and len(generator) != len(prompts):
            raise ValueError(f"got {len(generator)} generators for {len(prompts)} prompts: pass one per prompt")
        factor = 2 ** (len(self.unet.config.block_out_channels) - 1)
        if height % factor or width % factor:
            raise ValueError(f"height and width must be multiples of {factor} for this UNet, got {height}x{width}")
        if output_type not in _OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {_OUTPUT_TYPES}, got {output_type!r}")
        if output_type == "pil" and self.image_channels not in (1, 3):
            raise ValueError(f"PIL output needs 1 or 3 channels, the UNet has {self.image_channels}: use output_type='np'")

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        num_inference_steps: int = 20,
        guidance_scale: float = 3.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        height: int | None = None,
        width: int | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Draw one image per prompt.

        Args:
            prompt: a description or a list of descriptions.
            num_inference_steps: denoising steps.
            guidance_scale: classifier-free guidance weight ``w`` in
                ``eps = eps(empty) + w * (eps(text) - eps(empty))``; ``<= 1`` disables guidance.
            generator: one ``torch.Generator`` or a list with one per prompt (per-image seeds).
            height, width: output size in pixels; default the UNet's ``sample_size``.
            output_type: ``"pil"`` (mode "L" or "RGB"), ``"np"`` (float32 ``(B, H, W, C)`` in [0, 1])
                or ``"pt"`` (``(B, C, H, W)`` in [0, 1]).
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        default_h, default_w = self.default_size
        height, width = height or default_h, width or default_w
        self._check_inputs(prompts, num_inference_steps, generator, height, width, output_type)
        device = self._execution_device
        batch = len(prompts)

        context, mask = self.encode_prompt(prompts, device)
        do_guidance = guidance_scale > 1.0
        if do_guidance:
            empty, empty_mask = self.encode_prompt([""], device)
            context = torch.cat([empty.expand(batch, -1, -1), context])
            mask = torch.cat([empty_mask.expand(batch, -1), mask])

        shape = (batch, self.image_channels, height, width)
        sample = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        sample = sample * self.scheduler.init_noise_sigma
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        step_kwargs = {"generator": generator} if "generator" in inspect.signature(self.scheduler.step).parameters else {}

        for t in self.progress_bar(self.scheduler.timesteps):
            model_in = torch.cat([sample, sample]) if do_guidance else sample
            model_in = self.scheduler.scale_model_input(model_in, t)
            pred = self.unet(model_in, t, encoder_hidden_states=context, encoder_attention_mask=mask).sample
            if do_guidance:
                pred_empty, pred_text = pred.chunk(2)
                pred = pred_empty + guidance_scale * (pred_text - pred_empty)
            sample = self.scheduler.step(pred, t, sample, **step_kwargs).prev_sample

        image = (sample.clamp(-1.0, 1.0) + 1.0) / 2.0
        if output_type != "pt":
            image = image.float().cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                image = _to_pil(image)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)
