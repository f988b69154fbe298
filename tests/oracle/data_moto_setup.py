"""Sets up a moto S3 server started with INITIAL_NO_AUTH_ACTION_COUNT=4 for the
kvd-data tests: a bucket and an IAM user with full access, whose key is printed
as `ACCESS_KEY SECRET_KEY`. Exactly four unauthenticated requests are made;
after them moto checks signatures and permissions, so wrong keys are refused."""
import json
import sys

import boto3

endpoint, bucket = sys.argv[1], sys.argv[2]
kw = dict(endpoint_url=endpoint, region_name="us-east-1",
          aws_access_key_id="setup", aws_secret_access_key="setup")
s3 = boto3.client("s3", **kw)
iam = boto3.client("iam", **kw)
s3.create_bucket(Bucket=bucket)                                   # 1
iam.create_user(UserName="kvd")                                   # 2
iam.put_user_policy(UserName="kvd", PolicyName="all",            # 3
                    PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [
                        {"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
key = iam.create_access_key(UserName="kvd")["AccessKey"]          # 4
print(key["AccessKeyId"], key["SecretAccessKey"])
