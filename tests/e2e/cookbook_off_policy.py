"""The cookbook library's `distillation.train_off_policy` (no recipe module wraps it) against a
live lorafleet server, offline: `lorafleet.cookbook.install` supplies tokenizer and renderer,
the data is a local chats file, the teacher the base model itself.

    python tests/e2e/cookbook_off_policy.py BASE_URL MODEL CHATS_JSONL LOG_PATH
"""

from __future__ import annotations

import asyncio
import os
import sys


def main(base_url: str, model: str, chats: str, log_path: str) -> None:
    for k, v in (("TINKER_API_KEY", "tml-local"), ("TINKER_TELEMETRY", "0"), ("HF_HUB_OFFLINE", "1")):
        os.environ.setdefault(k, v)
    from tinker_cookbook.distillation import train_off_policy
    from tinker_cookbook.distillation.datasets import TeacherConfig
    from tinker_cookbook.supervised.data import FromConversationFileBuilder
    from tinker_cookbook.supervised.types import ChatDatasetBuilderCommonConfig

    from lorafleet import cookbook
    from lorafleet.config import paths_from_env

    cookbook.install(model, paths_from_env())
    common = ChatDatasetBuilderCommonConfig(model_name_for_tokenizer=model, renderer_name=cookbook.RENDERER,
                                            max_length=64, batch_size=2)
    config = train_off_policy.Config(
        learning_rate=1e-3, model_name=model, recipe_name="lorafleet_off_policy", renderer_name=cookbook.RENDERER,
        lora_rank=4, n_teacher_targets=20, batch_size=2, save_every=0, eval_every=0, max_steps=2,
        log_path=log_path, base_url=base_url,
        dataset_configs=[train_off_policy.DatasetWithTeacher(
            dataset_builder=FromConversationFileBuilder(common_config=common, file_path=chats),
            teacher_config=TeacherConfig(base_model=model))],
    )
    asyncio.run(train_off_policy.main(config))


if __name__ == "__main__":
    main(*sys.argv[1:5])
