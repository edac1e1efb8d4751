rule normalise:
    input:
        manifest=P["manifest"],
        shard=P["shard"],
    output:
        normalised=P["normalised"],
        rejects=P["rejects"],
    params:
        cfg=stage_params(CFG, "normalise"),
        code=CODE["normalise"],
    log:
        f"{LOGS}/normalise/{{shard}}.log",
    benchmark:
        f"{LOGS}/benchmarks/normalise/{{shard}}.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=60,
    conda:
        "../envs/galpipe.yaml"
    script:
        "../scripts/normalise.py"
