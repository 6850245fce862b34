"""The NNCLR recipe, built on the op library. Needs the ``[examples]`` extra (torchvision,
scikit-learn, tqdm, matplotlib, safetensors), each imported only by the parts that use it.

    config      TrainConfig (one typed configuration; the CLI is generated from its fields), PRESETS
    trainer     Trainer: the loop, checkpoint and resume, metrics.csv, curves.png, final evaluation
    cli         nnclr-train (also examples/train_nnclr.py): parse, log, train, evaluate, export
    training    StepSettings, contrastive_step (one lookup of both views, then enqueue), LabelQueue and the
                NN accuracy, train_one_epoch, OnlineProbe, WarmupCosine
    models      NNCLR (any backbone), ProjectionHead, PredictionHead, the small encoder and ResNets
    losses      nnclr_loss, info_nce, contrastive_accuracy
    augment     SimCLRAugment: per-image SimCLR augmentations on batches, on the device
    data        in-memory uint8 datasets (digits, STL-10, CIFAR-10, image folders), seeded batches
    evaluate    linear probes and k-NN (majority and weighted, on nn_topk) on frozen features
    checkpoint  atomic files, checkpoints, RNG state
    export      export_encoder / load_encoder
"""
