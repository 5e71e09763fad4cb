// Command podsecurity evaluates pods against a Pod Security Standards level with the library the
// API server's PodSecurity admission runs (k8s.io/pod-security-admission/policy).
//
// Input on stdin: a YAML stream or JSON objects: Pods, or anything with a pod template
// (spec.template: Jobs, Deployments, ...), or CronJobs (spec.jobTemplate.spec.template). Objects
// of other kinds are skipped. Output: one JSON line per pod found:
// {"kind": ..., "name": ..., "allowed": true|false, "forbidden": [{"reason": ..., "detail": ...}]}.
//
// Flags: -level restricted|baseline|privileged (default restricted), -version latest|v1.NN.
package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	psapi "k8s.io/pod-security-admission/api"
	"k8s.io/pod-security-admission/policy"
)

type object struct {
	Kind     string            `json:"kind"`
	Metadata metav1.ObjectMeta `json:"metadata"`
	Spec     json.RawMessage   `json:"spec"`
}

type withTemplate struct {
	Template    *corev1.PodTemplateSpec `json:"template"`
	JobTemplate *struct {
		Spec struct {
			Template *corev1.PodTemplateSpec `json:"template"`
		} `json:"spec"`
	} `json:"jobTemplate"`
}

type finding struct {
	Reason string `json:"reason"`
	Detail string `json:"detail"`
}

type verdict struct {
	Kind      string    `json:"kind"`
	Name      string    `json:"name"`
	Allowed   bool      `json:"allowed"`
	Forbidden []finding `json:"forbidden"`
}

func podOf(obj object) (*metav1.ObjectMeta, *corev1.PodSpec, error) {
	if obj.Kind == "Pod" {
		spec := &corev1.PodSpec{}
		if err := json.Unmarshal(obj.Spec, spec); err != nil {
			return nil, nil, err
		}
		return &obj.Metadata, spec, nil
	}
	if len(obj.Spec) == 0 {
		return nil, nil, nil
	}
	holder := withTemplate{}
	if err := json.Unmarshal(obj.Spec, &holder); err != nil {
		return nil, nil, err
	}
	template := holder.Template
	if template == nil && holder.JobTemplate != nil {
		template = holder.JobTemplate.Spec.Template
	}
	if template == nil {
		return nil, nil, nil
	}
	return &template.ObjectMeta, &template.Spec, nil
}

func main() {
	levelFlag := flag.String("level", "restricted", "Pod Security level")
	versionFlag := flag.String("version", "latest", "Pod Security version (latest or v1.NN)")
	flag.Parse()
	level, err := psapi.ParseLevel(*levelFlag)
	if err != nil {
		fmt.Fprintln(os.Stderr, "podsecurity:", err)
		os.Exit(2)
	}
	version, err := psapi.ParseVersion(*versionFlag)
	if err != nil {
		fmt.Fprintln(os.Stderr, "podsecurity:", err)
		os.Exit(2)
	}
	evaluator, err := policy.NewEvaluator(policy.DefaultChecks(), nil)
	if err != nil {
		fmt.Fprintln(os.Stderr, "podsecurity:", err)
		os.Exit(2)
	}
	lv := psapi.LevelVersion{Level: level, Version: version}
	decoder := utilyaml.NewYAMLOrJSONDecoder(bufio.NewReader(os.Stdin), 4096)
	out := json.NewEncoder(os.Stdout)
	for {
		var obj object
		if err := decoder.Decode(&obj); err != nil {
			if errors.Is(err, io.EOF) {
				return
			}
			fmt.Fprintln(os.Stderr, "podsecurity: reading stdin:", err)
			os.Exit(2)
		}
		meta, spec, err := podOf(obj)
		if err != nil {
			fmt.Fprintf(os.Stderr, "podsecurity: %s %s: %v\n", obj.Kind, obj.Metadata.Name, err)
			os.Exit(2)
		}
		if spec == nil {
			continue
		}
		v := verdict{Kind: obj.Kind, Name: obj.Metadata.Name, Allowed: true, Forbidden: []finding{}}
		for _, r := range evaluator.EvaluatePod(lv, meta, spec) {
			if !r.Allowed {
				v.Allowed = false
				v.Forbidden = append(v.Forbidden, finding{Reason: r.ForbiddenReason, Detail: r.ForbiddenDetail})
			}
		}
		_ = out.Encode(v)
	}
}
