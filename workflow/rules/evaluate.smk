rule evaluate:
    input:
        model="results/models/{experiment}/model.json",
        weights="results/models/{experiment}/weights.npz",
        history="results/models/{experiment}/history.csv",
        test="results/split/test.parquet",
    output:
        metrics="results/evaluation/{experiment}/metrics.json",
        predictions="results/evaluation/{experiment}/predictions.parquet",
        figures=report(
            directory("results/evaluation/{experiment}/figures"),
            patterns=["{name}.png"],
            caption="../report/figures.rst",
            category="{experiment}",
            labels={"experiment": "{experiment}", "artifact": "{name}"},
        ),
    params:
        cfg=stage_config(config, "evaluate"),
    log:
        "logs/evaluate/{experiment}.log",
    benchmark:
        "logs/benchmarks/evaluate/{experiment}.tsv"
    threads: 2
    resources:
        mem_mb=4000,
        runtime=60,
    conda:
        "../envs/galpipe.yaml"
    script:
        "../scripts/evaluate.py"


rule leaderboard:
    input:
        metrics=expand("results/evaluation/{experiment}/metrics.json", experiment=EXPERIMENTS),
        info=expand("results/models/{experiment}/train_info.json", experiment=EXPERIMENTS),
    output:
        table=report(
            "results/leaderboard.csv",
            caption="../report/leaderboard.rst",
            category="Comparison",
            labels={"artifact": "leaderboard (CSV download)"},
        ),
        html=report(
            "results/leaderboard.html",
            caption="../report/leaderboard.rst",
            category="Comparison",
            labels={"artifact": "leaderboard"},
        ),
        figure=report(
            "results/comparison.png",
            caption="../report/comparison.rst",
            category="Comparison",
            labels={"artifact": "comparison chart"},
        ),
    params:
        experiments=list(EXPERIMENTS),
    log:
        "logs/leaderboard.log",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        "../envs/galpipe.yaml"
    script:
        "../scripts/leaderboard.py"
