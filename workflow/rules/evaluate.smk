rule evaluate:
    input:
        model=P["model"],
        weights=P["weights"],
        history=P["history"],
        test=P["split"].format(split="test"),
    output:
        metrics=P["metrics"],
        predictions=P["predictions"],
        figures=report(
            directory(P["figures"]),
            patterns=["{name}.png"],
            caption="../report/figures.rst",
            category="{experiment}",
            labels={"experiment": "{experiment}", "artifact": "{name}"},
        ),
    params:
        cfg=stage_params(CFG, "evaluate"),
        code=CODE["evaluate"],
    log:
        f"{LOGS}/evaluate/{{experiment}}.log",
    benchmark:
        f"{LOGS}/benchmarks/evaluate/{{experiment}}.tsv"
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
        metrics=expand(P["metrics"], experiment=EXPERIMENTS),
        info=expand(P["train_info"], experiment=EXPERIMENTS),
        catalogue=P["catalogue"],
        split_summary=P["split_summary"],
    output:
        table=report(
            P["leaderboard"],
            caption="../report/leaderboard.rst",
            category="Comparison",
            labels={"artifact": "leaderboard (CSV download)"},
        ),
        html=report(
            P["leaderboard_html"],
            caption="../report/leaderboard.rst",
            category="Comparison",
            labels={"artifact": "leaderboard"},
        ),
        figure=report(
            P["comparison"],
            caption="../report/comparison.rst",
            category="Comparison",
            labels={"artifact": "comparison chart"},
        ),
        dataset=report(
            P["dataset_html"],
            caption="../report/dataset.rst",
            category="Data",
            labels={"artifact": "classes, splits and provenance"},
        ),
    params:
        experiments=list(EXPERIMENTS),
        code=CODE["leaderboard"],
    log:
        f"{LOGS}/leaderboard.log",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        "../envs/galpipe.yaml"
    script:
        "../scripts/leaderboard.py"
