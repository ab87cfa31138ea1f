"""A user's Keras program reporting through leap.KerasCallback (run by tests/test_sdk.py in its own
process: TensorFlow and torch do not share one). Writes what it saw to the JSON file argv[1]: the
/metrics page scraped at each epoch end (as Prometheus would mid-run), fit's loss and step count."""

import json
import os
import sys
import urllib.request

import keras
import numpy as np

import leap_trainer.sdk as leap

port = int(os.environ["LEAP_METRICS_PORT"])
pages = []


class Scraper(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            pages.append(response.read().decode())


rng = np.random.default_rng(0)
x = rng.normal(size=(2048, 20)).astype("float32")
y = (x[:, 0] > 0).astype("int32")
model = keras.Sequential([keras.Input((20,)), keras.layers.Dense(32, activation="relu"), keras.layers.Dense(2)])
model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
              steps_per_execution=4)
flops = int(sys.argv[2])   # given: the SDK has no FLOP counter for Keras
history = model.fit(x, y, batch_size=64, epochs=3, verbose=0,
                    callbacks=[leap.KerasCallback(batch_size=64, flops_per_sample=flops), Scraper()])
with open(sys.argv[1], "w") as out:
    json.dump({"pages": pages, "loss": history.history["loss"],
               "iterations": int(model.optimizer.iterations.numpy())}, out)
