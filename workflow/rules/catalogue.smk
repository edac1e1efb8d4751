rule catalogue:
    input:
        CATALOGUE_INPUTS,
    output:
        catalogue=P["catalogue"],
        shards=expand(P["shard"], shard=SHARDS),
    params:
        cfg=stage_params(CFG, "catalogue"),
        code=CODE["catalogue"],
    log:
        f"{LOGS}/catalogue.log",
    benchmark:
        f"{LOGS}/benchmarks/catalogue.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=60,
    conda:
        "../envs/galpipe.yaml"
    script:
        "../scripts/catalogue.py"
