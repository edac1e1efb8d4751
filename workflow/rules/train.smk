rule train:
    input:
        train=P["split"].format(split="train"),
        validation=P["split"].format(split="validation"),
        preset=lambda w: PRESET_FILES[w.experiment] or [],
        init=lambda w: INIT_FILES[w.experiment],
    output:
        model=P["model"],
        weights=P["weights"],
        history=report(
            P["history"],
            caption="../report/history.rst",
            category="{experiment}",
            labels={"experiment": "{experiment}", "artifact": "training history (CSV download)"},
        ),
        info=P["train_info"],
    params:
        exp=lambda w: experiment_params(CFG, EXPERIMENTS[w.experiment]),
        code=CODE["train"],
    log:
        f"{LOGS}/train/{{experiment}}.log",
    benchmark:
        f"{LOGS}/benchmarks/train/{{experiment}}.tsv"
    threads: 2
    resources:
        mem_mb=4000,
        runtime=240,
    conda:
        "../envs/galpipe.yaml"
    script:
        "../scripts/train.py"
