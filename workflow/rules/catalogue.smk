rule catalogue:
    output:
        catalogue="results/catalogue/catalogue.parquet",
        shards=expand("results/catalogue/shards/{shard}.parquet", shard=SHARDS),
    params:
        cfg=stage_config(config, "catalogue"),
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
