rule catalogue:
    output:
        catalogue=PATHS["catalogue"],
        shards=expand(PATHS["shard"], shard=SHARDS),
    params:
        cfg=stage_params(CFG, "catalogue"),
    log:
        "logs/catalogue.log",
    benchmark:
        "logs/benchmarks/catalogue.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=60,
    conda:
        "../envs/galpipe.yaml"
    script:
        "../scripts/catalogue.py"
