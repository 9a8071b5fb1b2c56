"""Dispersive loss (Wang & He, "Diffuse and Disperse", arXiv 2506.09027) on DiT / SiT.

One loop (experiments/dispersive.py) trains SiT (flow matching, linear or GVP path, velocity
prediction) or DiT (DDPM, epsilon prediction) with `L = L_diff + lambda * L_disp(block)`; the
arms of the paper differ only in `loss.*`:

  baseline                   --config.loss.weight=0
  paper (JAX) settings       loss.weight=0.5, loss.temperature=0.5, loss.blocks="quarter"
  released PyTorch settings  loss.weight=0.25, loss.temperature=1.0, loss.blocks="last"

`loss.blocks`: a 0-based block index (as a string or int), "quarter", "last" or "all".
"quarter" is the paper's "depth // 4" read as a 1-based block number: the output of block
number depth // 4 counting from 1, i.e. 0-based index depth // 4 - 1 (index 2 of SiT-B's 12
blocks, 6 of SiT-XL's 28): the representation after the first quarter of the network. "all"
averages the loss over every block (the paper's ablation; the averaging is our choice, so
lambda keeps its scale). `loss.gather`: "local" computes the loss on each device's own rows in a
`shard_map` and averages over devices (what both released runs do); "global" on the whole batch.

Main job (cpu preset: conditional SiT-linear on scikit-learn's 8x8 digits, 4 blocks of width
64, batch 64, 6000 steps, about 10 minutes on 2 cores; no upsampling: patch 2 gives 16 tokens
per digit, so "quarter" is block 0 and "last" block 3):

  python launch.py --config configs/dispersive.py:cpu --workdir runs/dispersive
  python launch.py --config configs/dispersive.py:cpu --workdir runs/dispersive --mode eval
  python launch.py --config configs/dispersive.py:cpu --config.loss.weight=0 --workdir runs/base

Evaluation writes `eval/samples_<step>.png` (rows of classes 0..9) and `eval/eval_<step>.json`
with "FD-digits": the Frechet distance between features of a small digits classifier
(contrastive_jax/evaluation/digits_classifier.py, trained on the train split) on N samples and
on the held-out test split, plus the classifier's accuracy on the samples' conditioning labels.
Results of the three arms: experiments/reports/dispersive.md.

MeanFlow (Geng et al. arXiv 2505.13447; `model.kind="meanflow"`, the `meanflow.*` keys) and
REPA (Yu et al. arXiv 2410.06940; the `repa.*` keys, off while repa.weight = 0) on the same
backbone, the paper's two comparisons:

  python launch.py --config configs/dispersive.py:cpu_meanflow --workdir runs/mf        # 1-NFE
  python launch.py --config configs/dispersive.py:cpu_meanflow --config.loss.weight=0 --workdir runs/mf_base
  python launch.py --config configs/dispersive.py:cpu_meanflow --workdir runs/mf --mode eval --config.eval.steps=2
  python launch.py --config configs/dispersive.py:cpu_repa --workdir runs/repa

At CPU scale REPA's encoder is a stand-in, this project's digits classifier trained with seed
`repa.encoder_seed` (not the seed-0 network FD-digits uses); the ImageNet REPA presets need
`repa.encoder_dir`, a local DINOv2-B/14 Hugging Face directory, and a JAX-traceable
`eval.decoder` (the encoder sees decoded images). `meanflow_xl2_imagenet`'s guidance
(omega 0.2, kappa 0.92, t in [0, 0.75]) is the MeanFlow paper's; the released code has B/4 only.

ImageNet presets hold the paper's settings (SD-VAE latents 32x32x4 read with TFDS, AdamW 1e-4,
wd 0, batch 256, EMA 0.9999, 400K steps); they need `data.data_dir` with the latents built by
`python -m contrastive_jax.data.imagenet_latents --vae SD_VAE_DIR` (posterior moments of each
crop and its flip; `--dinov2 DIR` adds REPA's targets), drawn per step as DiT/SiT do
(`data.latent_sampling="posterior"`, `data.flip=True`), and `vae.path` (the same SD-VAE) to
decode samples. Their `eval.feature_network` is "inception_v3": FID-50K streamed with ADM's
suite (contrastive_jax/evaluation/fid_stream.py): set `eval.inception_weights` to pytorch-fid's
pt_inception-2015-12-05-6726825d.pth and `eval.reference_batch` to ADM's
VIRTUAL_imagenet256_labeled.npz (FID, sFID, IS, precision/recall), or
`--config.eval.feature_network=none`; left "", the run stops with an error naming the key before
training. The paper's FID-50K is `--config.eval.num_samples=50000` (README: "ImageNet from
scratch").
"""

from configs.common import base_config, select_preset
from contrastive_jax.models.dit import dit_config


def get_config(preset: str = "cpu"):
  c = base_config("dispersive")
  c.model = dict(
    kind="sit",  # "sit" (flow matching, velocity) | "dit" (DDPM, epsilon) | "meanflow"
    input_size=8,
    in_channels=1,
    num_classes=10,
    depth=4,
    hidden_size=64,
    num_heads=4,
    patch_size=2,
    mlp_ratio=4.0,
    learn_sigma=False,
    class_dropout_prob=0.1,  # label dropout for classifier-free guidance
    remat="none",  # "none" | "full" | a policy of models/layers.py REMAT_POLICIES
    # nn.scan over blocks (one compiled block: TPU compiles of XL/2 take minutes, not an hour;
    # parameters stacked under "blocks", so a checkpoint of one setting does not load in the other)
    scan_layers=False,
  )
  c.diffusion = dict(path="linear")  # SiT path: "linear" | "gvp" (DiT ignores it)
  # MeanFlow (model.kind="meanflow"; official Gsunshine/meanflow defaults, MF-B/4 guidance).
  c.meanflow = dict(
    time_dist="logit_normal",  # (t, r) draws: "logit_normal" | "uniform"
    p_mean=-0.4,
    p_std=1.0,
    data_proportion=0.75,  # fraction of the batch with r = t (plain flow matching)
    omega=1.0,  # guidance in the target: v_g = omega v + (1 - omega - kappa) v_u + kappa v_c
    kappa=0.5,
    t_start=0.0,  # guidance applies for t in [t_start, t_end]
    t_end=1.0,
    norm_p=1.0,  # adaptive weight 1 / (||err||^2 + norm_eps)^norm_p
    norm_eps=0.01,
  )
  c.loss = dict(
    variant="infonce_l2",  # "infonce_l2" | "infonce_cosine" | "hinge" | "covariance"
    weight=0.5,  # lambda
    temperature=0.5,  # tau
    margin=1.0,  # epsilon of the hinge variant
    blocks="quarter",  # 0-based index | "quarter" (depth // 4 - 1) | "last" | "all"
    gather="local",  # "local" (per device, shard_map) | "global" (whole batch)
  )
  # REPA (Yu et al. arXiv 2410.06940): weight 0 = off (no projector, no encoder).
  c.repa = dict(
    weight=0.0,  # lambda of -mean cos(proj(h_block), encoder features); the paper's 0.5
    block=0,  # 0-based block whose tokens are projected (REPA --encoder-depth=8 is index 7)
    projector_width=2048,  # 3-layer SiLU MLP
    encoder="digits_classifier",  # "digits_classifier" (8x8 stand-in) | "dinov2"
    encoder_dir="",  # dinov2: a local Hugging Face DINOv2 directory (facebook/dinov2-base)
    encoder_dim=64,  # encoder feature width: digits classifier 64, DINOv2-B 768
    encoder_seed=1,  # digits_classifier: not the seed-0 network that FD-digits uses
    image_size=224,  # dinov2 input side (REPA resizes 256-px images to 224)
  )
  c.data = dict(
    name="digits",  # "digits" | "imagenet_latents"
    tfds_name="imagenet_latents/256",
    data_dir="",
    split="train",
    # imagenet_latents: the latent each step sees. "posterior" = a fresh z = mean + std * eps
    # of the stored posterior (DiT/SiT/REPA: vae.encode(x).latent_dist.sample() every step);
    # "mean" = the posterior mean. data.flip: a random horizontal flip per example and step
    # (DiT/SiT's RandomHorizontalFlip), read from the flip's own stored moments.
    latent_sampling="posterior",
    flip=True,
  )
  # SD-VAE (diffusers AutoencoderKL directory, e.g. stabilityai/sd-vae-ft-ema): decodes samples
  # for FID and grids; a latents dataset must have been built with the same weights and scale.
  c.vae = dict(
    path="",
    scaling_factor=0.18215,  # model input = (z - shift_factor) * scaling_factor (DiT/SiT)
    shift_factor=0.0,
    dtype="float32",  # decode compute dtype: "float32" | "bfloat16"
  )
  c.eval.update(
    params="ema",  # DiT/SiT evaluate the EMA weights (0.9999 at ImageNet scale)
    num_samples=1000,
    batch_size=500,
    sampler="ode_heun",  # SiT: ode_euler | ode_heun | sde; DiT: ddpm | ddim
    steps=32,
    cfg_scale=1.0,
    # Guided output channels: 0 = all of the sample's (pixels: the digits presets have 1) |
    # 3 = DiT/SiT forward_with_cfg's first 3 of the 4 latent channels (the ImageNet presets).
    cfg_channels=0,
    seed=0,
    grid_rows=10,  # the PNG holds grid_rows x num_classes samples
    feature_network="digits_classifier",  # "digits_classifier" | "inception_v3" | "none"
    classifier_steps=400,
    classifier_cache="",  # "" = <workdir>/classifier_cache
    decoder="",  # "" (images are pixels) or "module:function" mapping latents to [-1, 1] images
    inception_weights="",  # inception_v3: pytorch-fid's .pth (or .safetensors / .npz, same keys)
    reference_stats="",  # inception_v3: npz with the reference set's pool3 "mu", "sigma"
    # inception_v3: ADM's reference batch (VIRTUAL_imagenet256_labeled.npz: arr_0, mu, sigma,
    # mu_s, sigma_s): FID, sFID, Inception Score, precision/recall (instead of reference_stats).
    reference_batch="",
    precision_recall=True,  # with reference_batch: k = 3 manifolds of pool3 (ADM)
    fdd_encoder_dir="",  # a DINOv2 HF directory: adds FDD (DINOv2 CLS features) vs the batch
    # "balanced": labels 0, 1, .., C-1, 0, .. (N / C per class; N must divide) | "uniform": at
    # random per batch, DiT/SiT's sample_ddp.py (the ImageNet presets)
    class_sampling="balanced",
  )
  c.train.update(steps=6000, batch_size=64, log_every=100, eval_every=3000, checkpoint_every=1000)
  c.optim.update(
    name="adamw", lr=1e-3, schedule="cosine", warmup_steps=200, weight_decay=0.0, ema=0.999
  )
  c.optim.b2 = 0.999  # Adam beta2 (MeanFlow's official runs: 0.95)

  def cpu(c):
    pass

  def test(c):
    c.model.update(depth=2, hidden_size=32, num_heads=2)
    c.train.update(
      steps=6, batch_size=32, log_every=2, eval_every=0, checkpoint_every=3, async_checkpoint=False
    )
    c.optim.update(warmup_steps=2, ema=0.9)
    c.eval.update(num_samples=40, batch_size=20, steps=4, classifier_steps=60, grid_rows=2)

  def imagenet(c, size):
    c.model.update(
      kind="sit",
      input_size=32,
      in_channels=4,
      num_classes=1000,
      learn_sigma=True,
      mlp_ratio=4.0,
      # One scanned block (XL/2's TPU compile here: 6152 s unrolled, about 200 s scanned). A
      # scanned backward keeps every residual of every block, so dots_saveable (matmul outputs
      # kept, elementwise recomputed) comes with it: XL/2 at 64 images per v5p chip takes
      # 51.6 GB (40.0 GB unrolled without remat); experiments/reports/scale.md.
      scan_layers=True,
      remat="dots_saveable",
      **dit_config(size),
    )
    c.data.update(name="imagenet_latents")
    c.train.update(
      steps=400_000, batch_size=256, log_every=100, eval_every=50_000, checkpoint_every=10_000
    )
    c.optim.update(lr=1e-4, schedule="constant", warmup_steps=0, weight_decay=0.0, ema=0.9999)
    c.eval.update(
      num_samples=10_000,
      batch_size=250,
      sampler="sde",
      steps=250,
      cfg_scale=1.0,
      cfg_channels=3,  # as DiT/SiT's forward_with_cfg, so FID at cfg > 1 compares with theirs
      grid_rows=1,
      feature_network="inception_v3",
      class_sampling="uniform",
    )

  def sit_b2_imagenet(c):
    imagenet(c, "B/2")

  def sit_xl2_imagenet(c):
    imagenet(c, "XL/2")
    c.eval.update(cfg_scale=1.5)

  def dit_b2_imagenet(c):
    imagenet(c, "B/2")
    # DiT's learned variance needs its L_vlb term, which this loop does not train: fixed-small
    # posterior variance, epsilon-only MSE.
    c.model.update(kind="dit", learn_sigma=False)
    c.eval.update(sampler="ddpm", steps=250)

  def sit_b2_imagenet_released(c):
    imagenet(c, "B/2")
    c.loss.update(weight=0.25, temperature=1.0, blocks="last")

  def cpu_repa(c):
    # SiT + REPA on digits: the stand-in encoder on block 0 (the dispersive term's "quarter").
    # Projector width 256, not the paper's 2048: REPA's 2048 is 2-3x SiT-B/XL's width; on the
    # width-64 digits model it would be 30x and its 26 GFLOP a step dominated the step (1 step/s
    # on 2 cores against 10 for SiT alone).
    c.loss.weight = 0.0
    c.repa.update(weight=0.5, block=0, projector_width=256)

  def test_repa(c):
    test(c)
    cpu_repa(c)
    c.repa.projector_width = 64

  def imagenet_repa(c, size, block):
    imagenet(c, size)
    c.loss.weight = 0.0
    c.repa.update(weight=0.5, block=block, encoder="dinov2", encoder_dim=768, image_size=224)
    c.data.tfds_name = "imagenet_latents/256_dinov2"  # built with --dinov2: stored targets

  def sit_b2_imagenet_repa(c):
    imagenet_repa(c, "B/2", 3)  # REPA code: --encoder-depth=4 for SiT-B

  def sit_xl2_imagenet_repa(c):
    imagenet_repa(c, "XL/2", 7)  # --encoder-depth=8 for SiT-XL
    c.eval.update(cfg_scale=1.5)

  def meanflow_digits(c):
    c.model.kind = "meanflow"
    c.eval.update(sampler="meanflow", steps=1)  # 1-NFE; --config.eval.steps=2 for 2-NFE

  def cpu_meanflow(c):
    meanflow_digits(c)

  def test_meanflow(c):
    test(c)
    meanflow_digits(c)

  def meanflow_imagenet(c, size):
    # Official MeanFlow: Adam(W) b2 0.95, lr 1e-4 constant, wd 0, batch 256, EMA 0.9999, 240
    # epochs of ImageNet's 1,281,167 images (5005 steps each), 1-NFE evaluation.
    imagenet(c, size)
    c.model.update(kind="meanflow", learn_sigma=False)
    c.optim.update(b2=0.95)
    c.train.update(steps=240 * 5005)
    c.eval.update(sampler="meanflow", steps=1, cfg_scale=1.0)

  def meanflow_b4_imagenet(c):
    meanflow_imagenet(c, "B/4")  # official configs/run_b4.yml: omega 1.0, kappa 0.5, [0, 1]

  def meanflow_xl2_imagenet(c):
    meanflow_imagenet(c, "XL/2")
    # The released code ships only B/4; these are the paper's MF-XL/2 settings (Table 4).
    c.meanflow.update(omega=0.2, kappa=0.92, t_start=0.0, t_end=0.75)

  presets = {
    "cpu": cpu,
    "test": test,
    "sit_b2_imagenet": sit_b2_imagenet,
    "sit_xl2_imagenet": sit_xl2_imagenet,
    "dit_b2_imagenet": dit_b2_imagenet,
    "sit_b2_imagenet_released": sit_b2_imagenet_released,
    "cpu_repa": cpu_repa,
    "test_repa": test_repa,
    "sit_b2_imagenet_repa": sit_b2_imagenet_repa,
    "sit_xl2_imagenet_repa": sit_xl2_imagenet_repa,
    "cpu_meanflow": cpu_meanflow,
    "test_meanflow": test_meanflow,
    "meanflow_b4_imagenet": meanflow_b4_imagenet,
    "meanflow_xl2_imagenet": meanflow_xl2_imagenet,
  }
  return select_preset(preset, presets, c)
