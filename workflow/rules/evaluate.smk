rule evaluate:
    input:
        model=PATHS["model"],
        weights=PATHS["weights"],
        history=PATHS["history"],
        test=PATHS["split"].format(split="test"),
    output:
        metrics=PATHS["metrics"],
        predictions=PATHS["predictions"],
        figures=report(
            directory(PATHS["figures"]),
            patterns=["{name}.png"],
            caption="../report/figures.rst",
            category="{experiment}",
            labels={"experiment": "{experiment}", "artifact": "{name}"},
        ),
    params:
        cfg=stage_params(CFG, "evaluate"),
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
        metrics=expand(PATHS["metrics"], experiment=EXPERIMENTS),
        info=expand(PATHS["train_info"], experiment=EXPERIMENTS),
    output:
        table=report(
            PATHS["leaderboard"],
            caption="../report/leaderboard.rst",
            category="Comparison",
            labels={"artifact": "leaderboard (CSV download)"},
        ),
        html=report(
            PATHS["leaderboard_html"],
            caption="../report/leaderboard.rst",
            category="Comparison",
            labels={"artifact": "leaderboard"},
        ),
        figure=report(
            PATHS["comparison"],
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
