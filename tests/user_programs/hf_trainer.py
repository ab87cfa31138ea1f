"""A user's Hugging Face Trainer program reporting through leap.TransformersCallback, with a tiny
GPT-2 built from a config (no downloads). Run by tests/test_sdk.py in its own process; writes the
/metrics pages scraped at each epoch end and after training, the Trainer's step count, and the
FLOPs per sample of one training step counted by torch's FlopCounterMode outside the SDK, to argv[1]."""

import json
import os
import sys
import urllib.request

import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode

import leap_trainer.sdk as leap

port = int(os.environ["LEAP_METRICS_PORT"])
pages = []


def scrape():
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
        pages.append(response.read().decode())


class Scraper(transformers.TrainerCallback):
    def on_epoch_end(self, args, state, control, **kwargs):
        scrape()


config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2)
torch.manual_seed(0)
model = transformers.GPT2LMHeadModel(config)
ids = torch.randint(0, 64, (96, 16))


class Rows(torch.utils.data.Dataset):
    def __len__(self):
        return len(ids)

    def __getitem__(self, i):
        return {"input_ids": ids[i], "labels": ids[i]}


with FlopCounterMode(display=False) as counter:
    model(input_ids=ids[:8], labels=ids[:8]).loss.backward()
model.zero_grad()

args = transformers.TrainingArguments(output_dir=sys.argv[2], per_device_train_batch_size=4,
                                      gradient_accumulation_steps=2, num_train_epochs=2, logging_steps=4,
                                      save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True)
trainer = transformers.Trainer(model=model, args=args, train_dataset=Rows(),
                               callbacks=[leap.TransformersCallback(), Scraper()])
trainer.train()
scrape()
with open(sys.argv[1], "w") as out:
    json.dump({"pages": pages, "steps": trainer.state.global_step,
               "flops_per_sample": counter.get_total_flops() / 8}, out)
