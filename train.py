"""Train a diffusion model: `python train.py --flagfile=celeba.flags [--output_dir=runs/celeba64]`.

Rerunning the same command resumes from the run directory's last checkpoint.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
# Data
flags.DEFINE_enum("dataset", "celeba", ["celeba", "celeba_tfds", "fashion_mnist", "cifar10", "synthetic"], "Training data.")
flags.DEFINE_string("data_dir", None, "CelebA image folder (or its parent); TFDS data dir for TFDS datasets.")
flags.DEFINE_enum("crop", "celeba64", ["celeba64", "center140"], "CelebA crop box (see keras_ddpm/data.py).")
flags.DEFINE_string("cache", "memory", "tf.data cache after crop+resize: 'memory', a directory, or 'none'.")
flags.DEFINE_integer("image_size", None, "Image side; default: the dataset's usual size.")
# Model
flags.DEFINE_integer("width", 128, "Channels at the first U-Net level.")
flags.DEFINE_list("channel_multipliers", ["1", "2", "2", "2"], "Width multiplier per resolution level.")
flags.DEFINE_integer("num_res_blocks", 2, "Residual blocks per level.")
flags.DEFINE_list("attention_resolutions", ["16"], "Resolutions with self-attention (besides the bottleneck).")
flags.DEFINE_boolean("bottleneck_attention", True, "Self-attention in the middle block.")
flags.DEFINE_integer("num_heads", 4, "Attention heads.")
flags.DEFINE_float("dropout", 0.1, "Dropout in residual blocks.")
flags.DEFINE_integer("norm_groups", 32, "GroupNormalization groups.")
flags.DEFINE_boolean("conditional", None, "Class-conditional model; default: when the dataset has labels.")
flags.DEFINE_float("label_dropout", 0.1, "Classifier-free guidance: probability of the null label in training.")
# Diffusion
flags.DEFINE_enum("schedule", "linear", ["linear", "cosine"], "Noise schedule.")
flags.DEFINE_integer("num_timesteps", 1000, "Diffusion steps T.")
flags.DEFINE_enum("objective", "epsilon", ["epsilon", "v"], "What the network predicts.")
flags.DEFINE_enum("loss_weighting", "none", ["none", "min_snr"], "Loss weighting over timesteps.")
flags.DEFINE_float("ema_decay", 0.9999, "EMA decay of the sampling weights.")
# Optimisation
flags.DEFINE_float("learning_rate", 2e-4, "Peak Adam learning rate.")
flags.DEFINE_integer("warmup_steps", 5000, "Linear learning-rate warm-up steps.")
flags.DEFINE_float("weight_decay", 0.0, "Decoupled weight decay.")
flags.DEFINE_float("clipnorm", 1.0, "Global gradient-norm clip (0 = off).")
flags.DEFINE_integer("batch_size", 128, "Global batch size (split across replicas).")
flags.DEFINE_integer("train_steps", 100_000, "Total optimizer steps.")
flags.DEFINE_integer("steps_per_epoch", 1000, "Steps per Keras epoch; a checkpoint, a log row and maybe a grid each.")
flags.DEFINE_integer("keep_checkpoints", 3, "Checkpoints kept (only weights that train well are saved).")
flags.DEFINE_integer("restore_checkpoint", None, "Resume from checkpoints/ckpt-N (N = its step) instead of the newest; newer checkpoints are deleted.")
# Hardware
flags.DEFINE_enum("precision", "auto", ["auto", "float32", "mixed_float16", "mixed_bfloat16"],
                  "auto: mixed_float16 on a GPU, mixed_bfloat16 on a CPU with native bf16 (AMX-BF16 or AVX512_BF16), "
                  "float32 elsewhere.")
flags.DEFINE_boolean("xla", False, "Compile the train step with XLA (jit_compile).")
flags.DEFINE_enum("strategy", "auto", ["auto", "one_device", "mirrored", "multi_worker", "tpu"], "tf.distribute strategy.")
# Run
flags.DEFINE_string("output_dir", "runs/default", "Run directory (checkpoints, logs, grids, SavedModel).")
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.DEFINE_integer("sample_every_epochs", 1, "Sample-grid interval in epochs.")
flags.DEFINE_integer("num_samples", 64, "Images in each sample grid.")
flags.DEFINE_integer("sample_steps", 50, "DDIM steps for the sample grids.")
flags.DEFINE_integer("validation_images", 0, "Held-out images for val_loss each epoch (0 = none).")
flags.DEFINE_integer("swd_every_epochs", 0, "Log the SWD of EMA samples vs validation images every N epochs and keep best_ema.weights.h5 (0 = off).")
flags.DEFINE_integer("swd_images", 512, "Samples and validation images per SWD measurement.")
flags.DEFINE_boolean("monitor_face", False, "With --swd_every_epochs: also log face_rate, face_fd and face_landmark_fd (MTCNN, offline) beside SWD.")
flags.DEFINE_boolean("export", True, "Export <output_dir>/savedmodel/1 at the end.")
flags.DEFINE_enum("export_sampler", "ddim", ["ddpm", "ddim", "dpm++"], "The export's default sampler (serving_default).")
flags.DEFINE_integer("export_steps", 50, "The export's default number of sampling steps.")
flags.DEFINE_float("export_eta", 0.0, "The export's default DDIM eta in [0, 1]; also used for sample grids and SWD.")
flags.DEFINE_integer("export_max_batch", 64, "Most seeds (or denoise images) one request to the export may hold; more fail with INVALID_ARGUMENT.")
flags.DEFINE_boolean("traceback", False, "Show the full traceback on errors.")


def configs_from_flags():
    from keras_ddpm.config import ModelConfig
    from keras_ddpm.data import dataset_info
    from keras_ddpm.training import TrainConfig

    info = dataset_info(FLAGS.dataset)
    conditional = info.num_classes > 0 if FLAGS.conditional is None else FLAGS.conditional
    if conditional and not info.num_classes:
        raise ValueError(f"--conditional needs a dataset with labels; {FLAGS.dataset} has none.")
    model_config = ModelConfig(
        image_size=FLAGS.image_size or info.image_size,
        channels=info.channels,
        num_classes=info.num_classes if conditional else 0,
        width=FLAGS.width,
        channel_multipliers=tuple(int(m) for m in FLAGS.channel_multipliers),
        num_res_blocks=FLAGS.num_res_blocks,
        attention_resolutions=tuple(int(r) for r in FLAGS.attention_resolutions),
        bottleneck_attention=FLAGS.bottleneck_attention,
        num_heads=FLAGS.num_heads,
        dropout=FLAGS.dropout,
        norm_groups=FLAGS.norm_groups,
        schedule=FLAGS.schedule,
        num_timesteps=FLAGS.num_timesteps,
        objective=FLAGS.objective,
        loss_weighting=FLAGS.loss_weighting,
        ema_decay=FLAGS.ema_decay,
        label_dropout=FLAGS.label_dropout,
    )
    train_config = TrainConfig(
        dataset=FLAGS.dataset,
        data_dir=FLAGS.data_dir,
        crop=FLAGS.crop,
        cache=None if FLAGS.cache == "none" else FLAGS.cache,
        batch_size=FLAGS.batch_size,
        train_steps=FLAGS.train_steps,
        steps_per_epoch=FLAGS.steps_per_epoch,
        keep_checkpoints=FLAGS.keep_checkpoints,
        restore_checkpoint=FLAGS.restore_checkpoint,
        learning_rate=FLAGS.learning_rate,
        warmup_steps=FLAGS.warmup_steps,
        weight_decay=FLAGS.weight_decay,
        clipnorm=FLAGS.clipnorm,
        precision=FLAGS.precision,
        jit_compile=FLAGS.xla,
        strategy=FLAGS.strategy,
        seed=FLAGS.seed,
        sample_every_epochs=FLAGS.sample_every_epochs,
        num_samples=FLAGS.num_samples,
        sample_steps=FLAGS.sample_steps,
        validation_images=FLAGS.validation_images,
        swd_every_epochs=FLAGS.swd_every_epochs,
        swd_images=FLAGS.swd_images,
        monitor_face=FLAGS.monitor_face,
        export=FLAGS.export,
        export_sampler=FLAGS.export_sampler,
        export_steps=FLAGS.export_steps,
        export_eta=FLAGS.export_eta,
        export_max_batch=FLAGS.export_max_batch,
    )
    return model_config, train_config


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from keras_ddpm.cli import report_errors, quiet_logs
    from keras_ddpm.training import train

    quiet_logs()
    with report_errors("train.py", FLAGS.traceback):
        model_config, train_config = configs_from_flags()
        train(model_config, train_config, FLAGS.output_dir)
        written = "samples/, log.csv, loss.png" + (", savedmodel/1" if train_config.export else "")
        print(f"Finished: {FLAGS.output_dir} ({written}).")


if __name__ == "__main__":
    sys.exit(app.run(main))
