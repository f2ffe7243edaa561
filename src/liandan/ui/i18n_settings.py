"""The settings of the training forms in Chinese. A setting is defined once, in `liandan.config`,
with an English docstring that is its help in English; here is its help in Chinese and a short
Chinese name shown after the setting's own (the name stays: it is what YAML and ``--set`` take).

An entry is keyed by the setting (``lr``, ``lora.rank``), or by stage and setting (``dpo:lr``)
where that stage's docstring says something else; the stage's own entry wins.
`tests/test_ui_i18n_settings.py` holds every setting of every stage to having both, and a stage
whose docstring differs to having its own.

    setting_label("zh", "dpo", "lr")                    # 'lr · 学习率'
    setting_help("zh", "dpo", "lr", field.help)         # '峰值学习率（AdamW）；DPO 宜用比 SFT 更小的学习率。'
    setting_help("en", "dpo", "lr", field.help)         # the docstring, as it is
"""

from __future__ import annotations

ZH_HELP = {
    # Model, data and schedule
    "model": "基座模型：default、模型目录、.gguf 文件或 Hub 模型 id。",
    "data": "训练数据文件（JSONL、JSON、CSV、Parquet；pretrain 可用 .txt）。",
    "eval_data": "留出的验证数据，格式与本阶段的训练数据相同（对话、偏好对或纯文本）：训练过程中用它计算验证损失和本阶段的统计指标。",
    "eval_fraction": "未给 eval_data 时，从训练数据中留出这个比例作为验证集（0 = 不留出）。",
    "output_dir": "运行目录。",
    "sft:output_dir": "运行目录：存放配置、manifest 清单、指标、检查点，以及最终的适配器或模型。",
    "full": "全参数微调，而不是 LoRA。",
    "quantize": "QLoRA：\"4bit\" 在 CUDA GPU 上以 4 位（bitsandbytes NF4）加载冻结的基座权重，并在其上训练 LoRA 适配器；不设置则按存储的精度加载权重。不能与 full: true 同时使用。",
    "lr": "峰值学习率（AdamW）。",
    "dpo:lr": "峰值学习率（AdamW）；DPO 宜用比 SFT 更小的学习率。",
    "epochs": "训练轮数：遍历训练数据的次数（max_steps > 0 时忽略）。",
    "dpo:epochs": "训练轮数：遍历偏好对的次数（max_steps > 0 时忽略）。",
    "pretrain:epochs": "训练轮数：遍历文本的次数（max_steps > 0 时忽略）。",
    "grpo:epochs": "训练轮数：遍历提示词的次数（max_steps > 0 时忽略）。",
    "max_steps": "要运行的优化器步数；0 表示根据 epochs 推算。",
    # SFT
    "format": "强制指定数据格式（messages、sharegpt、alpaca、prompt_completion）；不设置则自动检测。",
    "skip_invalid": "丢弃无效记录（并报告出来），而不是在遇到第一条时就停止。",
    "packing": "把多个样本打包进同一行、不做填充：位置 id 在每个样本处从头开始，注意力不会跨越样本，因此不会在填充 token 上浪费算力。",
    "replay": '混入通用数据以缓解遗忘："self"（基座模型对通用提示词的自有回答，训练前生成并缓存）或一个数据文件。',
    "replay_ratio": "每个任务样本搭配的回放样本数（最多 1：回放数据不能压过任务数据）。",
    "replay_prompts": '回放 "self" 时让基座模型回答的提示词："default"（自带）或一个 .jsonl/.txt 文件。',
    "replay_max_new_tokens": "自回放回答的最大长度（token）；在此长度内没有自己停下的回答会被舍弃。",
    "tools_template": (
        "用于工具调用数据、而模型自己的对话模板不渲染工具时：\"chatml\"（liandan 带工具的 ChatML 模板，适用于默认模型等 ChatML 模型）"
        "或一个 .jinja 文件。运行目录会把它随分词器一起保存；自己的模板能渲染工具的模型保留自己的模板。"
    ),
    # DPO
    "dpo:beta": (
        "损失的缩放系数：策略模型可以偏离参考模型多远（越大越贴近参考模型）；对 ORPO 即其 lambda。"
        "不设置时用该损失自己的默认值：simpo 为 2.0（出自其论文），其余为 0.1。"
    ),
    "label_smoothing": "保守 DPO：假定标反了的偏好对所占的比例（0 = 普通 DPO）；仅用于 loss 为 sigmoid 和 simpo 时。",
    "loss": "sigmoid（DPO）、ipo、orpo 或 simpo（后两者都不需要参考模型），或 kto（可用非成对数据）。",
    "sft_weight": "在被选回答（chosen）上额外加一项 NLL 损失的权重（0 = 关闭）；不能与 orpo（其损失已含这一项）或 kto 同用。",
    "simpo_gamma": (
        "SimPO 的目标奖励间隔 gamma：被选回答按长度归一化的奖励须比被拒回答的高出这么多"
        "（1.0 = 默认 beta 的一半，即论文中的 gamma / beta = 0.5）。"
    ),
    "desirable_weight": "KTO：正例（desirable）损失的权重（正例较少时调高）。",
    "undesirable_weight": "KTO：负例（undesirable）损失的权重。",
    # GRPO
    "rewards": (
        "奖励设置（`liandan.rewards`）：checks（记录自带的检查项）、KEY=VALUE 检查项、schema=FILE（按符合程度打分）、"
        "stop、max_tokens=N、python=module:function（需 --allow-code）。"
    ),
    "reward_weights": "每个奖励一个权重（默认各为 1）；总奖励是它们的加权和。",
    "num_generations": "每个提示词采样的补全数：奖励在这一组补全之间比较。",
    "max_completion_length": "采样补全的最大长度（token）。",
    "temperature": "采样补全时的温度（大于 0）。",
    "top_p": "核采样：只保留累计概率达到该值的最可能的 token。",
    "top_k": "只在概率最高的 k 个 token 中采样（0 = 全部）。",
    "num_iterations": "每轮补全上执行的优化器步数（大于 1 时，相对采样时的策略做裁剪）。",
    "epsilon": "概率比的下裁剪界为 1 - epsilon。",
    "epsilon_high": "概率比的上裁剪界为 1 + epsilon_high（DAPO 将其提高到 0.28）。",
    "grpo:beta": "相对参考模型的 KL 惩罚权重（0 = 不加，也不做参考模型的前向计算；用 k3 估计量）。",
    "loss_type": (
        "token 损失的平均方式：grpo（先在每个补全内平均，再在补全之间平均）、"
        "dr_grpo（总和 / (补全数 × max_completion_length)）或 dapo（总和 / 所有补全的 token 总数）。"
    ),
    "scale_rewards": "优势值除以奖励的标准差：组内的（group）、整个训练步的（batch），或者不除（none）。",
    "mask_truncated_completions": "长度用尽被截断的补全（没有停止 token）不参与训练。",
    # LoRA
    "lora.rank": "LoRA 秩 r：低秩更新的宽度。",
    "lora.alpha": "LoRA 缩放系数的分子：更新量乘以 alpha / rank。",
    "lora.dropout": (
        "训练时作用在 LoRA 输入上的 dropout。默认关闭：为每个适配层的输入重新采样掩码，"
        "曾占到 CPU 上一个训练步 30% 的时间（默认模型，2 核）。"
    ),
    "lora.target_modules": '要适配的模块名；["all-linear"] 适配除输出头以外的所有线性层。',
    # Everything else
    "weight_decay": "AdamW 的权重衰减。",
    "warmup_ratio": "学习率线性预热所占的步数比例，之后按余弦衰减。",
    "batch_tokens": "一个微批次的 token 数（打包时），或填充后的大小预算（不打包时）。",
    "batch_size": "一个微批次最多包含的样本数（0 = batch_tokens 放得下多少就放多少）。",
    "grpo:batch_size": "一个微批次中的提示词数；每个提示词采样 num_generations 个补全。",
    "grad_accum": "每个优化器步累积的微批次数（梯度累积）。",
    "max_length": "样本的最大长度（token）；更长的会被截断（并报告）。",
    "pretrain:max_length": "块大小：把文本拼接起来（文档之间插入 EOS），再切成每块这么多 token。",
    "attention": (
        "训练用的注意力实现：auto（在 CPU 上训练打包的行时逐样本用 SDPA，否则用模型的默认实现）、"
        "eager、sdpa 或 flash_attention_2。"
    ),
    "activation_checkpointing": "激活重计算：反向传播时重新计算每个解码层的激活，而不是一直保存它们。序列很长或模型很大时显存/内存占用少得多，代价是每步多约三分之一的计算量。",
    "max_grad_norm": "把梯度范数裁剪到这个值（0 = 不裁剪）。",
    "mixed_precision": "混合精度：auto（支持时用 bf16）、no、bf16 或 fp16。",
    "seed": "数据打乱、dropout 和 LoRA 初始化所用的随机种子。",
    "eval_every": "每 N 步评估一次（0 = 只在结束时评估，前提是有验证集）。",
    "save_every": "每 N 步写一个可续训的检查点（0 = 不按步数保存）。",
    "save_every_minutes": (
        "距上一个检查点超过这么多分钟时也写一个（0 = 不按时间保存）。"
        "它和 save_every 都为 0 时不保存检查点：一旦崩溃，整次运行就白跑了。"
    ),
    "save_total_limit": "只保留最新的 N 个检查点（0 = 全部保留）。",
    "max_bad_steps": "连续这么多步的损失或梯度范数不是有限值（NaN、inf）时停止运行（每个这样的步都会跳过，不更新权重）。",
    "resume_changed": "即使数据或训练设置与检查点中的不同，也允许 --resume。",
    "log_every": "每 N 步记录一次指标。",
    "sample_prompts": "运行结束时用来生成样例的提示词（保存在 samples.jsonl）。",
    "report_to": "通过 accelerate 接入的额外实验跟踪工具：tensorboard、wandb（需已安装）。",
    "trust_remote_code": "允许运行模型仓库中自带的模型代码。",
    "special_text": (
        "数据中以文字形式写出的特殊 token（例如 '<|im_start|>'）：error（停止，并指出 FILE:LINE 和字段）"
        "或 plain（当作普通字符训练）。绝不会被当作控制 token。"
    ),
}
"""Each setting's help in Chinese: a translation of its docstring in `liandan.config`."""

ZH_LABELS = {
    "model": "基座模型",
    "data": "训练数据",
    "eval_data": "验证数据",
    "eval_fraction": "验证集比例",
    "output_dir": "运行目录",
    "full": "全参数微调",
    "quantize": "量化基座",
    "lr": "学习率",
    "epochs": "训练轮数",
    "max_steps": "最大步数",
    "format": "数据格式",
    "skip_invalid": "跳过无效记录",
    "packing": "打包",
    "replay": "回放",
    "replay_ratio": "回放比例",
    "replay_prompts": "回放提示词",
    "replay_max_new_tokens": "回放最大生成长度",
    "tools_template": "工具模板",
    "dpo:beta": "偏离约束系数",
    "label_smoothing": "标签平滑",
    "loss": "损失函数",
    "sft_weight": "SFT 损失权重",
    "simpo_gamma": "SimPO 奖励间隔",
    "desirable_weight": "正例权重",
    "undesirable_weight": "负例权重",
    "rewards": "奖励",
    "reward_weights": "奖励权重",
    "num_generations": "每组补全数",
    "max_completion_length": "补全最大长度",
    "temperature": "温度",
    "top_p": "核采样阈值",
    "top_k": "候选 token 数",
    "num_iterations": "每轮优化步数",
    "epsilon": "下裁剪系数",
    "epsilon_high": "上裁剪系数",
    "grpo:beta": "KL 权重",
    "loss_type": "损失平均方式",
    "scale_rewards": "奖励缩放",
    "mask_truncated_completions": "屏蔽截断的补全",
    "lora.rank": "秩",
    "lora.alpha": "缩放系数",
    "lora.dropout": "丢弃率",
    "lora.target_modules": "目标模块",
    "weight_decay": "权重衰减",
    "warmup_ratio": "预热比例",
    "batch_tokens": "每批 token 数",
    "batch_size": "批大小",
    "grpo:batch_size": "每批提示词数",
    "grad_accum": "梯度累积步数",
    "max_length": "最大长度",
    "pretrain:max_length": "块大小",
    "attention": "注意力实现",
    "activation_checkpointing": "激活重计算",
    "max_grad_norm": "梯度裁剪",
    "mixed_precision": "混合精度",
    "seed": "随机种子",
    "eval_every": "评估间隔（步）",
    "save_every": "检查点间隔（步）",
    "save_every_minutes": "检查点间隔（分钟）",
    "save_total_limit": "保留检查点数",
    "max_bad_steps": "连续异常步上限",
    "resume_changed": "允许改动后续训",
    "log_every": "记录间隔（步）",
    "sample_prompts": "样例提示词",
    "report_to": "实验跟踪",
    "trust_remote_code": "信任仓库代码",
    "special_text": "特殊 token 文本",
}
"""A short Chinese name for each setting, shown after the setting's own name."""


def setting_label(lang: str, stage: str, name: str) -> str:
    """The label of a setting's widget: its name, and in Chinese a short gloss after it."""
    if lang != "zh":
        return name
    return f"{name} · {ZH_LABELS[entry(ZH_LABELS, stage, name)]}"


def setting_help(lang: str, stage: str, name: str, english: str) -> str:
    """The help of a setting's widget: ``english`` (its docstring), or its Chinese translation."""
    if lang != "zh":
        return english
    return ZH_HELP[entry(ZH_HELP, stage, name)]


def entry(table: dict[str, str], stage: str, name: str) -> str:
    """The key of ``table`` that holds ``name`` in ``stage``: the stage's own (``dpo:lr``), else
    the shared one (``lr``); a `KeyError` naming both when there is neither."""
    for key in (f"{stage}:{name}", name):
        if key in table:
            return key
    raise KeyError(f"no Chinese for setting '{name}' of {stage} (add '{name}' or '{stage}:{name}' in liandan.ui.i18n_settings)")
