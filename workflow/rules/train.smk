rule train:
    input:
        train=PATHS["split"].format(split="train"),
        validation=PATHS["split"].format(split="validation"),
    output:
        model=PATHS["model"],
        weights=PATHS["weights"],
        history=report(
            PATHS["history"],
            caption="../report/history.rst",
            category="{experiment}",
            labels={"experiment": "{experiment}", "artifact": "training history (CSV download)"},
        ),
        info=PATHS["train_info"],
    params:
        exp=lambda w: experiment_params(CFG, EXPERIMENTS[w.experiment]),
    log:
        "logs/train/{experiment}.log",
    benchmark:
        "logs/benchmarks/train/{experiment}.tsv"
    threads: 2
    resources:
        mem_mb=4000,
        runtime=240,
    conda:
        "../envs/galpipe.yaml"
    script:
        "../scripts/train.py"
