"""reference_numbers.py: every number the kit prints beside its own, in one table, with sources.

  paper-table1..4   the BCPT paper's ASPP-PFENet rows, mIoU (and FB-IoU) in % (PROTOCOL.md 11.1);
                    Table 3's rows are its components (Standard = neither, BMC = background mining
                    only, BMC+OCG = BCPT), Table 4's the number of centres K; both are ResNet-50,
                    5-shot
  bam-base-learner  the base-class mIoU of BAM's released PSPNet base learners on the val images
                    (PROTOCOL.md 11.2)
  bam-train-list    images in BAM's released fss training lists (novel-containing images dropped,
  bam-val-list      2048-pixel rule) and val lists, PASCAL-5i on the 5953-image pool (PROTOCOL.md
                    2.4)
  list-size         images in the official lists that prepare_data.py writes (PROTOCOL.md 2.2-2.3)

Columns: folds 0-3, then "all" (the mean over the folds as printed in the paper, or a whole list's
size) and FB-IoU; "-" where the source gives no number. Three of the paper's printed means are not
the mean of their folds (PROTOCOL.md 11.1): the kit prints them as printed.
"""

REFERENCE_TABLE = """
source           dataset backbone row       shot fold-0 fold-1 fold-2 fold-3   all fb-iou
paper-table1     pascal  vgg16    ImageNet  1     59.45  66.65  63.22  54.77 61.02  -
paper-table1     pascal  vgg16    ImageNet  5     63.39  70.11  67.66  62.51 65.92  -
paper-table1     pascal  vgg16    Standard  1     60.02  68.67  63.76  55.00 61.86  -
paper-table1     pascal  vgg16    Standard  5     64.02  71.51  69.39  63.55 67.12  -
paper-table1     pascal  vgg16    BCPT      1     60.77  69.96  64.28  56.60 62.90  -
paper-table1     pascal  vgg16    BCPT      5     65.21  72.68  70.81  64.81 68.38  -
paper-table1     pascal  resnet50 ImageNet  1     64.42  70.81  63.64  57.98 64.21  -
paper-table1     pascal  resnet50 ImageNet  5     67.10  72.31  63.64  63.19 66.56  -
paper-table1     pascal  resnet50 Standard  1     64.79  71.46  65.94  59.51 65.36  -
paper-table1     pascal  resnet50 Standard  5     67.59  73.21  67.63  65.97 68.60  -
paper-table1     pascal  resnet50 BCPT      1     68.73  71.57  65.69  61.22 66.87  -
paper-table1     pascal  resnet50 BCPT      5     73.20  74.25  69.38  67.50 71.21  -
paper-table1     coco    resnet50 ImageNet  1     37.11  47.47  43.20  41.28 42.27  -
paper-table1     coco    resnet50 ImageNet  5     43.25  52.94  48.58  48.01 48.20  -
paper-table1     coco    resnet50 Standard  1     37.57  48.21  44.13  42.68 43.15  -
paper-table1     coco    resnet50 Standard  5     44.89  52.85  50.30  48.44 49.12  -
paper-table1     coco    resnet50 BCPT      1     37.50  51.15  44.38  42.33 43.84  -
paper-table1     coco    resnet50 BCPT      5     45.47  53.98  50.94  49.01 49.85  -
paper-table2     pascal  resnet50 ImageNet  1     27.04  38.29  36.40  33.88 33.90  -
paper-table2     pascal  resnet50 Standard  1     28.65  40.43  43.33  36.85 37.32  -
paper-table2     pascal  resnet50 BCPT      1     38.52  47.08  46.01  38.65 42.57  -
paper-table3     pascal  resnet50 Standard  5     -      -      -      -     68.60  79.55
paper-table3     pascal  resnet50 BMC       5     -      -      -      -     70.15  80.44
paper-table3     pascal  resnet50 BMC+OCG   5     -      -      -      -     71.21  81.16
paper-table4     pascal  resnet50 K=2       5     72.89  74.95  67.15  68.87 70.97  81.09
paper-table4     pascal  resnet50 K=3       5     74.05  75.54  68.30  66.41 71.08  81.15
paper-table4     pascal  resnet50 K=6       5     73.20  74.25  69.38  67.50 71.21  81.16
bam-base-learner pascal  vgg16    standard  -     67.76  65.82  65.51  69.95 -      -
bam-base-learner pascal  resnet50 standard  -     71.43  69.17  69.19  73.72 -      -
bam-base-learner coco    vgg16    standard  -     44.99  43.04  45.92  45.05 -      -
bam-base-learner coco    resnet50 standard  -     50.84  49.41  51.95  50.89 -      -
bam-train-list   pascal  -        oslsm     -     4208   3726   2752   4510  -      -
bam-val-list     pascal  -        oslsm     -     364    445    592    336   -      -
list-size        pascal  -        val       -     -      -      -      -     1449   -
list-size        pascal  -        oslsm     -     -      -      -      -     5953   -
list-size        pascal  -        trainaug  -     -      -      -      -     10582  -
list-size        coco    -        train     -     -      -      -      -     82081  -
list-size        coco    -        val       -     -      -      -      -     40137  -
"""


def parse_reference_table(text):
    """{(source, dataset, backbone, row, shot): {"folds": [4], "all": x, "fb_iou": x}}, None where
    "-"."""
    table = {}
    for line in text.strip().splitlines()[1:]:
        source, dataset, backbone, row, shot, *numbers = line.split()
        values = [None if x == "-" else float(x) for x in numbers]
        shot = None if shot == "-" else int(shot)
        table[(source, dataset, backbone, row, shot)] = {
            "folds": values[:4],
            "all": values[4],
            "fb_iou": values[5],
        }
    return table


REFERENCE = parse_reference_table(REFERENCE_TABLE)


def reference(source, dataset, backbone="-", row="-", shot=None):
    """One row of REFERENCE, or None where the source reports nothing for it."""
    return REFERENCE.get((source, dataset, backbone, row, shot))
