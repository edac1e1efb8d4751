rule train:
    input:
        train="results/split/train.parquet",
        validation="results/split/validation.parquet",
    output:
        model="results/models/{experiment}/model.json",
        weights="results/models/{experiment}/weights.npz",
        history=report(
            "results/models/{experiment}/history.csv",
            caption="../report/history.rst",
            category="{experiment}",
            labels={"experiment": "{experiment}", "artifact": "training history (CSV download)"},
        ),
        info="results/models/{experiment}/train_info.json",
    params:
        exp=lambda w: experiment_params(config, EXPERIMENTS[w.experiment]),
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
